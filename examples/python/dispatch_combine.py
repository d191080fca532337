"""High-throughput dispatch and combine on every local GPU, from bare Python (NumPy data copied to the device).

    python examples/python/dispatch_combine.py
    python examples/python/dispatch_combine.py --zero-copy   # the peers write the rows straight into recv_x

Each rank routes 1024 BF16 tokens (H = 256) to the top 4 of 8 experts per rank, dispatches them, lets the "experts"
return the rows unchanged, combines, and checks both steps against pydeepep.reference. With --zero-copy the
communicator reserves a dispatch area and recv_x views it: it stays valid until this rank's next dispatch (and while
the communicator is open), so the example reads it before either.
"""

import argparse
import sys

import numpy as np

import pydeepep
from pydeepep import reference

NUM_TOKENS, HIDDEN, NUM_TOPK, EXPERTS_PER_RANK = 1024, 256, 4, 8


def bf16_values(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def inputs(rank, num_experts):
    rng = np.random.default_rng(rank)
    bits = reference.bf16_round(rng.standard_normal((NUM_TOKENS, HIDDEN)).astype(np.float32)).view(np.uint32) >> 16
    topk = np.argsort(rng.random((NUM_TOKENS, num_experts)), axis=1)[:, :NUM_TOPK].astype(np.int64)
    return bits.astype(np.uint16), topk


def run_rank(info, zero_copy):
    num_experts = EXPERTS_PER_RANK * info.nranks
    everyone = [inputs(r, num_experts) for r in range(info.nranks)]
    bits, topk = everyone[info.rank]
    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        max_tokens_per_rank=NUM_TOKENS,
        hidden=HIDDEN,
        num_topk=NUM_TOPK,
        zero_copy_dispatch=zero_copy,
    ) as comm:
        x = pydeepep.to_device(bits, device=comm.device)
        got = comm.dispatch(x, topk_idx=pydeepep.to_device(topk, device=comm.device), num_experts=num_experts)
        out = comm.combine(got.recv_x, got.handle).out  # identity experts
        received, combined = bf16_values(got.recv_x.to_numpy()), bf16_values(out.to_numpy())
    values = [bf16_values(b) for b, _ in everyone]
    want = reference.dispatch(values, [t for _, t in everyone], None, num_experts)
    want_out = reference.combine([w[0] for w in want], [w[4] for w in want], [NUM_TOKENS] * info.nranks)
    ok = np.array_equal(received, want[info.rank][0]) and np.array_equal(combined, want_out[info.rank])
    print(
        f"rank {info.rank}/{info.nranks}: received {received.shape[0]} rows, combine "
        f"{'matches the reference' if ok else 'DIFFERS from the reference'}",
        flush=True,
    )
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero-copy", action="store_true", help="dispatch into the communicator's dispatch area")
    args = parser.parse_args()
    if pydeepep.launch.local_device_count() == 0:
        print("no CUDA GPU is visible: this example needs at least one", file=sys.stderr)
        return 2
    return 0 if all(pydeepep.spawn(run_rank, args=(args.zero_copy,))) else 1


if __name__ == "__main__":
    sys.exit(main())
