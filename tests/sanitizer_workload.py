"""One rank of a tiny 2-rank workload, small enough to run under compute-sanitizer (tests/run_sanitizer.sh starts
both ranks, each under its own compute-sanitizer).

    python -P tests/sanitizer_workload.py --rank 0 --nranks 2 --uid-file /tmp/job.id --workload ht_combine &
    python -P tests/sanitizer_workload.py --rank 1 --nranks 2 --uid-file /tmp/job.id --workload ht_combine

Rank 0 writes a fresh bootstrap id to the id file (use a new path per job) and the other ranks read it. Every rank
builds every rank's inputs from the same seeds, checks its own outputs against pydeepep.reference bit for bit, and
exits 0 when they match, 3 when they do not, 1 on an exception. Needs no array library (NumPy and pydeepep only).
"""

import argparse
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the tests' shared helpers (run with -P)
from conftest import bf16_bits, bf16_values, e4m3_values  # noqa: E402

WORKLOADS = ("layout", "ht_dispatch", "ht_combine", "ll")
N, H, E, K = 64, 256, 16, 4  # tokens per rank, hidden, experts, top-k
T = 32  # low-latency max tokens per rank


def routing(seed, rank, n, drop=0.2):
    """topk [n, K] of distinct experts with some -1 slots, and weights [n, K]."""
    rng = np.random.default_rng([seed, rank])
    topk = np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < drop] = -1
    return topk, rng.random((n, K)).astype(np.float32)


def payload(seed, rank, n, h):
    rng = np.random.default_rng([seed, 7, rank])
    magnitude = 10.0 ** rng.uniform(-2, 2, size=(n, 1))
    return bf16_bits((rng.standard_normal((n, h)) * magnitude).astype(np.float32))


class Checker:
    def __init__(self, rank):
        self.rank = rank
        self.failures = []

    def equal(self, what, got, want):
        if not np.array_equal(got, want):
            self.failures.append(what)
            print(f"rank {self.rank}: MISMATCH in {what}", flush=True)


def sync():
    from cuda.bindings import runtime

    (status,) = runtime.cudaDeviceSynchronize()
    if status != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaDeviceSynchronize failed: {status!r}")


def run_layout(comm, check, pydeepep, reference):
    R = comm.nranks
    topk, _ = routing(1, comm.rank, N)
    per_rank, per_expert, in_rank = comm.get_dispatch_layout(pydeepep.to_device(topk, device=comm.device), E)
    want = reference.dispatch_layout(topk, E, R)
    check.equal("layout tokens per rank", per_rank.to_numpy(), want[0])
    check.equal("layout tokens per expert", per_expert.to_numpy(), want[1])
    check.equal("layout token-in-rank mask", in_rank.to_numpy().astype(bool), want[2])


def check_ht_dispatch(check, what, result, want, fp8, rows=None):
    exp_x, exp_idx, exp_w, exp_counts, exp_src = want
    m = exp_src.shape[0]
    if rows is not None and result.recv_x.shape[0] != rows:
        check.failures.append(f"{what}: {result.recv_x.shape[0]} rows, expected {rows}")
        return
    if fp8:
        check.equal(f"{what} FP8 payload", result.recv_x.to_numpy()[:m], exp_x[0])
        check.equal(f"{what} FP8 scales", result.recv_scales.to_numpy()[:m], exp_x[1])
    else:
        check.equal(f"{what} BF16 payload", result.recv_x.to_numpy()[:m], exp_x)
    check.equal(f"{what} recv_src_idx", result.recv_src_idx.to_numpy()[:m], exp_src[:, 1])
    check.equal(f"{what} recv_topk_idx", result.recv_topk_idx.to_numpy()[:m], exp_idx)
    if exp_w is not None:
        check.equal(f"{what} recv_topk_weights", result.recv_topk_weights.to_numpy()[:m], exp_w)
    if rows is None:
        check.equal(f"{what} per-expert counts", np.asarray(result.num_recv_tokens_per_expert), exp_counts)


def run_ht_dispatch(comm, check, pydeepep, reference):
    R, me, dev = comm.nranks, comm.rank, comm.device
    routes = [routing(2, r, N) for r in range(R)]
    topk_dev = pydeepep.to_device(routes[me][0], device=dev)
    w_dev = pydeepep.to_device(routes[me][1], device=dev)
    topks, weights = [t for t, _ in routes], [w for _, w in routes]

    # Exact size, BF16, with weights; then a cached dispatch of new data under the same routing.
    xs = [payload(3, r, N, H) for r in range(R)]
    result = comm.dispatch(pydeepep.to_device(xs[me], device=dev), topk_idx=topk_dev, topk_weights=w_dev, num_experts=E)
    check_ht_dispatch(check, "BF16 dispatch", result, reference.dispatch(xs, topks, weights, E)[me], False)
    xs2 = [payload(4, r, N, H) for r in range(R)]
    cached = comm.dispatch(
        pydeepep.to_device(xs2[me], device=dev), topk_idx=topk_dev, topk_weights=w_dev, handle=result.handle
    )
    check_ht_dispatch(check, "cached dispatch", cached, reference.dispatch(xs2, topks, weights, E)[me], False)

    # FP8 payload with float32 scales, no weights, expert alignment 4.
    qs = []
    for r in range(R):
        rng = np.random.default_rng([5, r])
        q = rng.integers(0, 256, size=(N, H), dtype=np.uint8)
        q[(q & 0x7F) == 0x7F] = 0  # no NaN patterns
        qs.append((q, rng.random((N, H // 128)).astype(np.float32)))
    fp8 = comm.dispatch(
        pydeepep.to_device(qs[me][0], device=dev),
        x_scales=pydeepep.to_device(qs[me][1], device=dev),
        topk_idx=topk_dev,
        num_experts=E,
        expert_alignment=4,
    )
    check_ht_dispatch(check, "FP8 dispatch", fp8, reference.dispatch(qs, topks, None, E, 4)[me], True)

    # Worst-case mode: fixed-size outputs, padding rows marked -1.
    worst = comm.dispatch(
        pydeepep.to_device(xs[me], device=dev), topk_idx=topk_dev, num_experts=E, num_worst_tokens=R * N
    )
    want = reference.dispatch(xs, topks, None, E)[me]
    check_ht_dispatch(check, "worst-case dispatch", worst, want, False, rows=R * N)
    check.equal("worst-case padding rows", bool(np.all(worst.recv_src_idx.to_numpy()[want[4].shape[0] :] == -1)), True)
    sync()
    comm.check_async_error()


def run_ht_combine(comm, check, pydeepep, reference):
    R, me, dev = comm.nranks, comm.rank, comm.device
    routes = [routing(6, r, N) for r in range(R)]
    topks, weights = [t for t, _ in routes], [w for _, w in routes]
    xs = [payload(7, r, N, H) for r in range(R)]
    result = comm.dispatch(
        pydeepep.to_device(xs[me], device=dev),
        topk_idx=pydeepep.to_device(topks[me], device=dev),
        topk_weights=pydeepep.to_device(weights[me], device=dev),
        num_experts=E,
    )
    want = reference.dispatch(xs, topks, weights, E)
    ms = [w[4].shape[0] for w in want]
    ys = [payload(8, r, ms[r], H) for r in range(R)]
    biases = [payload(9, r, N, H) for r in range(R)]
    out, out_w, _ = comm.combine(
        pydeepep.to_device(ys[me], device=dev),
        result.handle,
        topk_weights=result.recv_topk_weights,
        bias=pydeepep.to_device(biases[me], device=dev),
    )
    want_out = reference.combine(
        [bf16_values(y) for y in ys],
        [w[4] for w in want],
        [N] * R,
        [bf16_values(b) for b in biases],
        topk_weights=[w[2] for w in want],
    )[me]
    check.equal("combine output", bf16_values(out.to_numpy()), want_out[0])
    check.equal("combined weights", out_w.to_numpy(), want_out[1])
    # Identity experts through a second combine without weights or bias.
    out2 = comm.combine(result.recv_x, result.handle).out
    want2 = reference.combine([bf16_values(w[0]) for w in want], [w[4] for w in want], [N] * R)[me]
    check.equal("identity combine", bf16_values(out2.to_numpy()), want2)
    sync()
    comm.check_async_error()


def check_ll_dispatch(check, what, result, want, use_fp8):
    exp_x, exp_scales, exp_count, exp_src = want
    counts = result.recv_count.to_numpy()
    check.equal(f"{what} recv_count", counts, exp_count)
    if not np.array_equal(counts, exp_count):
        return
    got_x = result.recv_x.to_numpy()
    info = result.recv_src_info.to_numpy()
    scales = result.recv_scales.to_numpy() if use_fp8 else None
    for le, m in enumerate(counts):
        check.equal(f"{what} source tokens of local expert {le}", info[le, :m] & 0xFFFF, exp_src[le, :m, 1])
        if use_fp8:
            check.equal(f"{what} FP8 payload of local expert {le}", e4m3_values(got_x[le, :m]), exp_x[le, :m])
            check.equal(f"{what} scales of local expert {le}", scales[le, :m], exp_scales[le, :m])
        else:
            check.equal(f"{what} BF16 payload of local expert {le}", bf16_values(got_x[le, :m]), exp_x[le, :m])


def run_ll(comm, check, pydeepep, reference):
    R, me, dev = comm.nranks, comm.rank, comm.device
    local = E // R
    for step, (use_fp8, hook) in enumerate(((True, False), (False, True))):
        seed = 10 + 10 * step
        routes = [routing(seed, r, T) for r in range(R)]
        topks, weights = [t for t, _ in routes], [w for _, w in routes]
        xs = [payload(seed + 1, r, T, H) for r in range(R)]
        topk_dev = pydeepep.to_device(topks[me], device=dev)
        w_dev = pydeepep.to_device(weights[me], device=dev)
        result = comm.low_latency_dispatch(
            pydeepep.to_device(xs[me], device=dev), topk_dev, E, use_fp8=use_fp8, return_recv_hook=hook
        )
        if hook:
            result.hook()
        want = reference.low_latency_dispatch([bf16_values(x) for x in xs], topks, E, T, use_fp8=use_fp8)
        what = "LL FP8 dispatch" if use_fp8 else "LL BF16 dispatch (hook)"
        check_ll_dispatch(check, what, result, want[me], use_fp8)
        ys = [
            bf16_bits(np.random.default_rng([seed, 99, r]).standard_normal((local, R * T, H)).astype(np.float32))
            for r in range(R)
        ]
        out, combine_hook = comm.low_latency_combine(
            pydeepep.to_device(ys[me], device=dev), topk_dev, w_dev, result, return_recv_hook=hook
        )
        if hook:
            combine_hook()
        want_out = reference.low_latency_combine([bf16_values(y) for y in ys], topks, weights, [w[3] for w in want])[me]
        check.equal(f"{what}: combine output", bf16_values(out.to_numpy()), want_out)
    sync()
    comm.check_async_error()


RUNNERS = {"layout": run_layout, "ht_dispatch": run_ht_dispatch, "ht_combine": run_ht_combine, "ll": run_ll}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--nranks", type=int, default=2)
    parser.add_argument("--uid-file", required=True, help="a fresh path per job, shared by all ranks")
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), required=True)
    parser.add_argument("--device", type=int, default=None, help="default: the rank")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="communicator timeout in seconds (kernels run far slower under the sanitizer)",
    )
    args = parser.parse_args()

    # The environment-variable launcher of pydeepep.bootstrap: rank 0 writes the id file, the others wait for it.
    os.environ.update(
        RANK=str(args.rank),
        WORLD_SIZE=str(args.nranks),
        LOCAL_RANK=str(args.rank if args.device is None else args.device),
        DEEPEP_UNIQUE_ID_FILE=args.uid_file,
    )
    for key, value in (("NVSHMEM_DISABLE_NVLS", "1"), ("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")):
        os.environ.setdefault(key, value)
    import pydeepep
    from pydeepep import bootstrap, reference

    start = time.monotonic()
    check = Checker(args.rank)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    try:
        info = bootstrap.from_env(timeout=args.timeout)
        with pydeepep.Communicator(
            info.unique_id,
            info.rank,
            info.nranks,
            device=info.device,
            timeout=args.timeout,
            max_tokens_per_rank=N,
            hidden=H,
            num_topk=K,
            num_experts=E,
            low_latency_max_tokens=T if "ll" in workloads else 0,
        ) as comm:
            for name in workloads:
                RUNNERS[name](comm, check, pydeepep, reference)
                print(f"rank {args.rank}: {name} ran ({time.monotonic() - start:.1f} s)", flush=True)
    except Exception:
        traceback.print_exc()
        print(f"rank {args.rank}: FAILED with an exception", flush=True)
        return 1
    if check.failures:
        print(f"rank {args.rank}: {len(check.failures)} mismatches: {check.failures}", flush=True)
        return 3
    print(f"rank {args.rank}: {'+'.join(workloads)} OK in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
