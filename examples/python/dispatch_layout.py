"""Dispatch layout on every local GPU, from bare Python (NumPy on the host) or with CuPy / cuda.core arrays.

    python examples/python/dispatch_layout.py            # NumPy host data copied with pydeepep.to_device
    python examples/python/dispatch_layout.py --cupy     # CuPy device arrays in, CuPy views of the results out

Each rank routes 1024 tokens to the top 8 of 64 experts and prints how many tokens go to each rank.
"""

import argparse
import sys

import numpy as np

import pydeepep
from pydeepep import reference

NUM_TOKENS, NUM_TOPK, EXPERTS_PER_RANK = 1024, 8, 32


def run_rank(info, use_cupy):
    num_experts = EXPERTS_PER_RANK * info.nranks
    rng = np.random.default_rng(info.rank)
    topk_idx = np.argsort(rng.random((NUM_TOKENS, num_experts)), axis=1)[:, :NUM_TOPK].astype(np.int64)
    topk_idx[rng.random(topk_idx.shape) < 0.1] = -1  # some slots unused

    with pydeepep.Communicator(
        info.unique_id, info.rank, info.nranks, device=info.device, max_tokens_per_rank=NUM_TOKENS
    ) as comm:
        if use_cupy:
            import cupy

            with cupy.cuda.Device(comm.device):
                stream = cupy.cuda.Stream(non_blocking=True)
                with stream:
                    topk_dev = cupy.asarray(topk_idx)
                per_rank, per_expert, in_rank = comm.get_dispatch_layout(topk_dev, num_experts, stream=stream)
                with stream:
                    tokens_per_rank = cupy.asnumpy(cupy.from_dlpack(per_rank))
                    mask = cupy.asnumpy(cupy.from_dlpack(in_rank))
        else:
            topk_dev = pydeepep.to_device(topk_idx, device=comm.device)
            per_rank, per_expert, in_rank = comm.get_dispatch_layout(topk_dev, num_experts)
            tokens_per_rank, mask = per_rank.to_numpy(), in_rank.to_numpy()

    want_per_rank, _, want_mask = reference.dispatch_layout(topk_idx, num_experts, info.nranks)
    ok = np.array_equal(tokens_per_rank, want_per_rank) and np.array_equal(mask, want_mask)
    print(
        f"rank {info.rank}/{info.nranks}: tokens per rank {tokens_per_rank.tolist()} "
        f"{'matches the reference' if ok else 'DIFFERS from the reference'}",
        flush=True,
    )
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cupy", action="store_true", help="use CuPy arrays and a CuPy stream")
    parser.add_argument("--nranks", type=int, default=None, help="ranks to start (default: one per local GPU)")
    args = parser.parse_args()
    if pydeepep.launch.local_device_count() == 0:
        print("no CUDA GPU is visible: this example needs at least one", file=sys.stderr)
        return 2
    results = pydeepep.spawn(run_rank, nprocs=args.nranks, args=(args.cupy,))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
