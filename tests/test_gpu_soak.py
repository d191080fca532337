"""GPU soak: many mixed high-throughput and low-latency calls with random shapes and routing on RANKS ranks (2
unless DEEPEP_TEST_RANKS says otherwise).

Each iteration is either HT (dispatch + combine, sometimes a cached dispatch + combine under the same routing) or LL
(low_latency_dispatch + low_latency_combine), with random N, H, K, E, -1 slots, payload type and options. All ranks
draw these choices from one shared seed, so every call stays collective; each rank draws only its own data, except
on checked iterations (the first of each variant, then every CHECK_EVERY-th, and the last), where it draws every
rank's to compare its outputs with pydeepep.reference bit for bit. Device memory in use (after a synchronisation and
pydeepep.empty_cache()) is recorded after iteration BASELINE_AT and at the end; it must not grow by more than SLACK.

DEEPEP_SOAK_ITERS sets the number of iterations (default 1000). Inputs are NumPy arrays copied with
pydeepep.to_device, so no array library is involved.
"""

import gc
import os
import time
import traceback

import numpy as np
import pytest
from conftest import RANKS, bf16_bits, bf16_values, e4m3_values, exact_equal, requires_ranks, spawn_ranks

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(RANKS)]

ITERATIONS = int(os.environ.get("DEEPEP_SOAK_ITERS", "1000"))
CHECK_EVERY = 50
BASELINE_AT = 100
SLACK = 64 << 20  # bytes of device memory growth tolerated between the baseline and the end
SEED = 20240611

MAX_N, T, MAX_H, MAX_K, MAX_E = 256, 64, 1024, 8, 32  # the communicator's limits (T: low-latency max tokens)
HIDDENS_FP8 = (256, 512, 1024)
HIDDENS_BF16 = (256, 392, 512, 1024)
EXPERTS = (8, 16, 32)

# The first iterations run every variant once (and are checked), so that later memory growth is not a first use.
VARIANTS = [
    dict(kind="ht", fp8=False, weights=True, cached=True),
    dict(kind="ht", fp8=True, weights=False, cached=True),
    dict(kind="ht", fp8=False, weights=False, cached=False, alignment=8),
    dict(kind="ht", fp8=True, weights=True, cached=False),
    dict(kind="ll", fp8=True, round_scale=False, ue8m0=False, hook=False),
    dict(kind="ll", fp8=True, round_scale=True, ue8m0=False, hook=True),
    dict(kind="ll", fp8=True, round_scale=True, ue8m0=True, hook=False),
    dict(kind="ll", fp8=False, round_scale=False, ue8m0=False, hook=True),
]


def choose(rng, it, nranks):
    """What iteration `it` does. Every rank calls this with the same generator state, so it returns the same."""
    c = dict(
        kind="ht" if rng.random() < 0.5 else "ll",
        fp8=bool(rng.random() < 0.5),
        weights=bool(rng.random() < 0.7),
        cached=bool(rng.random() < 0.3),
        alignment=int(rng.choice((1, 1, 1, 8))),
        round_scale=bool(rng.random() < 0.5),
        ue8m0=bool(rng.random() < 0.5),
        hook=bool(rng.random() < 0.2),
        e=int(rng.choice(EXPERTS)),
        k=int(rng.integers(1, MAX_K + 1)),
        drop=float(rng.choice((0.0, 0.1, 0.5))),
        hf=int(rng.choice(HIDDENS_FP8)),
        hb=int(rng.choice(HIDDENS_BF16)),
        ht_tokens=[int(v) for v in rng.integers(1, MAX_N + 1, size=nranks)],
        ll_tokens=[int(v) for v in rng.integers(1, T + 1, size=nranks)],
        empty=[bool(v) for v in rng.random(nranks) < 0.03],
    )
    if it < len(VARIANTS):
        c.update(VARIANTS[it])
    c["k"] = min(c["k"], c["e"])
    c["round_scale"] = c["round_scale"] and c["fp8"]  # scale options shape FP8 scales only
    c["ue8m0"] = c["ue8m0"] and c["round_scale"]
    c["h"] = c["hf"] if c["fp8"] else c["hb"]
    tokens = c["ht_tokens"] if c["kind"] == "ht" else c["ll_tokens"]
    c["ns"] = [0 if empty else n for n, empty in zip(tokens, c["empty"], strict=True)]
    return c


def describe(c):
    common = f"{c['kind']} N={c['ns']} H={c['h']} K={c['k']} E={c['e']} drop={c['drop']} fp8={c['fp8']}"
    if c["kind"] == "ht":
        return f"{common} weights={c['weights']} cached={c['cached']} alignment={c['alignment']}"
    return f"{common} round_scale={c['round_scale']} ue8m0={c['ue8m0']} hook={c['hook']}"


def routing(it, rank, c):
    """topk [n, K] (distinct experts, some slots -1) and weights [n, K] of one rank."""
    rng = np.random.default_rng([SEED, it, rank, 0])
    n, k, e = c["ns"][rank], c["k"], c["e"]
    topk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64)
    topk[rng.random((n, k)) < c["drop"]] = -1
    return topk, rng.random((n, k)).astype(np.float32)


def payload(it, rank, c, tag):
    """One rank's tokens: FP8 bits and float32 scales for HT FP8, else BF16 bits (rows of very different sizes)."""
    rng = np.random.default_rng([SEED, it, rank, tag])
    n, h = c["ns"][rank], c["h"]
    if c["kind"] == "ht" and c["fp8"]:
        return rng.integers(0, 256, size=(n, h), dtype=np.uint8), rng.random((n, h // 128)).astype(np.float32)
    x = rng.standard_normal((n, h), dtype=np.float32) * (10.0 ** rng.uniform(-3, 3, size=(n, 1))).astype(np.float32)
    return bf16_bits(x)


_EXPERT_OUTPUTS = {}


def expert_outputs(rank, h, shape):
    """BF16 bits standing for expert outputs: a slice of one fixed random block per (rank, H), made once."""
    block = _EXPERT_OUTPUTS.get((rank, h))
    if block is None:
        rng = np.random.default_rng([SEED, 99, rank, h])
        rows = max(RANKS * MAX_N, MAX_E * T)  # enough for HT (R * N rows) and LL (E_loc * R * T rows)
        block = _EXPERT_OUTPUTS[(rank, h)] = bf16_bits(rng.standard_normal((rows, h), dtype=np.float32))
    count = int(np.prod(shape[:-1]))
    return block[:count].reshape(shape)


def upload(comm, array):
    return None if array is None else pydeepep.to_device(array, device=comm.device)


def compare(problems, what, got, want):
    """Values by value and sign (exact_equal: -0.0 is not +0.0); bits and ids, which the oracle may hold as floats,
    by value."""
    got, want = np.asarray(got), np.asarray(want)
    both_values = got.dtype.kind == "f" and want.dtype.kind == "f"
    if not (exact_equal(got, want) if both_values else np.array_equal(got, want)):
        problems.append(f"{what} differs")


def ht_step(comm, it, c, check):
    """HT dispatch + combine (+ cached dispatch + combine); returns the problems found (checked iterations only)."""
    R, me = comm.nranks, comm.rank
    ranks = range(R) if check else (me,)
    run = dict(routes={r: routing(it, r, c) for r in ranks}, xs={r: payload(it, r, c, 1) for r in ranks})
    fp8, routes, xs = c["fp8"], run["routes"], run["xs"]

    # The calls: the same on every rank, whatever the outputs hold.
    topk_dev = upload(comm, routes[me][0])
    w_dev = upload(comm, routes[me][1]) if c["weights"] else None
    x_dev, s_dev = (upload(comm, xs[me][0]), upload(comm, xs[me][1])) if fp8 else (upload(comm, xs[me]), None)
    first = run["first"] = comm.dispatch(
        x_dev,
        x_scales=s_dev,
        topk_idx=topk_dev,
        topk_weights=w_dev,
        num_experts=c["e"],
        expert_alignment=c["alignment"],
    )
    rows = first.recv_x.shape[0]
    y_dev = upload(comm, expert_outputs(me, c["h"], (rows, c["h"])))
    run["combined"] = comm.combine(y_dev, first.handle, topk_weights=first.recv_topk_weights)
    if c["cached"]:
        xs2 = run["xs2"] = {r: payload(it, r, c, 2) for r in ranks}
        x2 = (upload(comm, xs2[me][0]), upload(comm, xs2[me][1])) if fp8 else (upload(comm, xs2[me]), None)
        again = run["again"] = comm.dispatch(
            x2[0], x_scales=x2[1], topk_idx=topk_dev, topk_weights=w_dev, handle=first.handle
        )
        run["combined_again"] = comm.combine(y_dev, first.handle, topk_weights=again.recv_topk_weights)
    return verify(verify_ht, comm, c, run) if check else []


def verify(check, comm, c, run):
    """Runs a comparison; an exception in it is a problem of this iteration, never a reason to leave the loop (the
    other rank would be left waiting in the next collective call)."""
    try:
        return check(comm, c, run)
    except Exception:
        return [traceback.format_exc(limit=4)]


def verify_ht(comm, c, run):
    R, me, fp8, weights = comm.nranks, comm.rank, c["fp8"], c["weights"]
    problems = []
    topks = [run["routes"][r][0] for r in range(R)]
    ws = [run["routes"][r][1] for r in range(R)] if weights else None
    want = reference.dispatch([run["xs"][r] for r in range(R)], topks, ws, c["e"], c["alignment"])
    check_ht_dispatch(problems, "dispatch", run["first"], want[me], fp8)
    if problems:
        return problems  # the oracle's combine inputs would not be what ran
    ms = [w[4].shape[0] for w in want]
    ys = [bf16_values(expert_outputs(r, c["h"], (ms[r], c["h"]))) for r in range(R)]
    want_out = reference.combine(
        ys, [w[4] for w in want], c["ns"], topk_weights=[w[2] for w in want] if weights else None
    )[me]
    out, out_w, _ = run["combined"]
    compare(problems, "combine output", bf16_values(out.to_numpy()), want_out[0] if weights else want_out)
    if weights:
        compare(problems, "combined weights", out_w.to_numpy(), want_out[1])
    if c["cached"]:
        want2 = reference.dispatch([run["xs2"][r] for r in range(R)], topks, ws, c["e"], c["alignment"])
        check_ht_dispatch(problems, "cached dispatch", run["again"], want2[me], fp8)
        # The same routing and expert outputs: the oracle's combine again, weights included.
        again_out, again_w, _ = run["combined_again"]
        compare(
            problems,
            "combine after the cached dispatch",
            bf16_values(again_out.to_numpy()),
            want_out[0] if weights else want_out,
        )
        if weights:
            compare(problems, "combined weights after the cached dispatch", again_w.to_numpy(), want_out[1])
    return problems


def check_ht_dispatch(problems, what, result, want, fp8):
    exp_x, exp_idx, exp_w, exp_counts, exp_src = want
    m = exp_src.shape[0]
    if result.recv_x.shape[0] != m:
        problems.append(f"{what}: {result.recv_x.shape[0]} rows received, expected {m}")
        return
    if fp8:
        compare(problems, f"{what} FP8 payload", result.recv_x.to_numpy(), exp_x[0])
        compare(problems, f"{what} FP8 scales", result.recv_scales.to_numpy(), exp_x[1])
    else:
        compare(problems, f"{what} BF16 payload", result.recv_x.to_numpy(), exp_x)
    compare(problems, f"{what} recv_src_idx", result.recv_src_idx.to_numpy(), exp_src[:, 1])
    compare(problems, f"{what} recv_topk_idx", result.recv_topk_idx.to_numpy(), exp_idx)
    if exp_w is not None:
        compare(problems, f"{what} recv_topk_weights", result.recv_topk_weights.to_numpy(), exp_w)
    if result.num_recv_tokens_per_expert != [int(v) for v in exp_counts]:
        problems.append(f"{what}: per-expert counts {result.num_recv_tokens_per_expert} != {exp_counts.tolist()}")


def ll_step(comm, it, c, check):
    """LL dispatch + combine; returns the problems found (checked iterations only)."""
    R, me = comm.nranks, comm.rank
    ranks = range(R) if check else (me,)
    run = dict(routes={r: routing(it, r, c) for r in ranks}, xs={r: payload(it, r, c, 1) for r in ranks})
    local, h = c["e"] // R, c["h"]

    topk_dev, w_dev = upload(comm, run["routes"][me][0]), upload(comm, run["routes"][me][1])
    result = run["result"] = comm.low_latency_dispatch(
        upload(comm, run["xs"][me]),
        topk_dev,
        c["e"],
        use_fp8=c["fp8"],
        round_scale=c["round_scale"],
        use_ue8m0=c["ue8m0"],
        return_recv_hook=c["hook"],
    )
    if c["hook"]:
        result.hook()
    y_dev = upload(comm, expert_outputs(me, h, (local, R * T, h)))
    out, hook = comm.low_latency_combine(y_dev, topk_dev, w_dev, result, return_recv_hook=c["hook"])
    if c["hook"]:
        hook()
    run["out"] = out
    return verify(verify_ll, comm, c, run) if check else []


def verify_ll(comm, c, run):
    R, me = comm.nranks, comm.rank
    local, h, result = c["e"] // R, c["h"], run["result"]
    problems = []
    topks = [run["routes"][r][0] for r in range(R)]
    want = reference.low_latency_dispatch(
        [bf16_values(run["xs"][r]) for r in range(R)], topks, c["e"], T, use_fp8=c["fp8"], round_scale=c["round_scale"]
    )
    exp_x, exp_scales, exp_count, exp_src = want[me]
    counts = result.recv_count.to_numpy()
    if not np.array_equal(counts, exp_count):
        return [f"recv_count {counts.tolist()} != {exp_count.tolist()}"]
    got_x = result.recv_x.to_numpy()
    info = result.recv_src_info.to_numpy()
    sizes = result.recv_layout_range.to_numpy()[:, :, 1]
    scales = result.recv_scales.to_numpy() if c["fp8"] else None
    for le in range(local):
        m = int(counts[le])
        compare(problems, f"source ranks of local expert {le}", np.repeat(np.arange(R), sizes[le]), exp_src[le, :m, 0])
        compare(problems, f"source tokens of local expert {le}", info[le, :m] & 0xFFFF, exp_src[le, :m, 1])
        if c["fp8"]:
            compare(problems, f"FP8 payload of local expert {le}", e4m3_values(got_x[le, :m]), exp_x[le, :m])
            want_scales = reference.ue8m0_pack(exp_scales[le, :m]) if c["ue8m0"] else exp_scales[le, :m]
            compare(problems, f"scales of local expert {le}", scales[le, :m], want_scales)
        else:
            compare(problems, f"BF16 payload of local expert {le}", bf16_values(got_x[le, :m]), exp_x[le, :m])
    ys = [bf16_values(expert_outputs(r, h, (local, R * T, h))) for r in range(R)]
    weights = [run["routes"][r][1] for r in range(R)]
    want_out = reference.low_latency_combine(ys, topks, weights, [w[3] for w in want])[me]
    compare(problems, "combine output", bf16_values(run["out"].to_numpy()), want_out)
    return problems


def device_memory_in_use(device):
    """Bytes in use on the device (cudaMemGetInfo) once finished work is synchronised and pools are trimmed."""
    from cuda.bindings import runtime

    gc.collect()
    (status,) = runtime.cudaSetDevice(device)
    assert status == runtime.cudaError_t.cudaSuccess, status
    for _ in range(2):  # a trim returns frees that completed; the second catches any that were still in flight
        (status,) = runtime.cudaDeviceSynchronize()
        assert status == runtime.cudaError_t.cudaSuccess, status
        pydeepep.empty_cache(device)
    status, free, total = runtime.cudaMemGetInfo()
    assert status == runtime.cudaError_t.cudaSuccess, status
    return total - free


def soak_rank(info, iterations):
    out = dict(failures=[], error=None, memory=None, checks=0, kinds={"ht": 0, "ll": 0}, seconds=None)
    shared = np.random.default_rng(SEED)  # the same sequence of choices on every rank
    baseline_at = min(BASELINE_AT, max(1, iterations // 2))
    baseline = None
    comm = pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=30,
        max_tokens_per_rank=MAX_N,
        hidden=MAX_H,
        num_topk=MAX_K,
        num_experts=MAX_E,
        low_latency_max_tokens=T,
    )
    # Not a `with` block: a failing close (the peer stopped early) is recorded, so every rank's own report (and the
    # first error, whichever rank met it) reaches the test instead of only the first rank to raise.
    try:
        start = time.monotonic()
        it = -1
        try:
            for it in range(iterations):
                c = choose(shared, it, comm.nranks)
                check = it < len(VARIANTS) or it % CHECK_EVERY == CHECK_EVERY - 1 or it == iterations - 1
                step = ht_step if c["kind"] == "ht" else ll_step
                problems = step(comm, it, c, check)
                comm.check_async_error()
                out["kinds"][c["kind"]] += 1
                out["checks"] += check
                for problem in problems:
                    if len(out["failures"]) < 20:
                        out["failures"].append(f"iteration {it} ({describe(c)}): {problem}")
                if it + 1 == baseline_at:
                    baseline = device_memory_in_use(comm.device)
            end = device_memory_in_use(comm.device)
            comm.check_async_error()
            out["memory"] = (baseline, end)
        except Exception:
            out["error"] = f"iteration {it}:\n{traceback.format_exc()}"
        out["seconds"] = time.monotonic() - start
    finally:
        try:
            comm.close()
        except Exception:
            out["error"] = (out["error"] or "") + f"\nclose:\n{traceback.format_exc()}"
    return out


@pytest.fixture(scope="module")
def soak():
    results = spawn_ranks(soak_rank, nprocs=RANKS, args=(ITERATIONS,), timeout=600 * RANKS)
    for rank, r in enumerate(results):
        memory = r["memory"] and [None if v is None else round(v / 2**20, 1) for v in r["memory"]]
        print(
            f"rank {rank}: {ITERATIONS} iterations ({r['kinds']}) in {r['seconds']:.1f} s, {r['checks']} checked, "
            f"device memory in use (MiB) after iteration {min(BASELINE_AT, max(1, ITERATIONS // 2))} and at the "
            f"end: {memory}"
        )
    return results


def test_soak_calls_run_and_match_the_oracle(soak):
    for rank, r in enumerate(soak):
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["failures"] == [], f"rank {rank}: " + "\n".join(r["failures"])
        assert r["checks"] >= ITERATIONS // CHECK_EVERY, r["checks"]


def test_soak_device_memory_does_not_grow(soak):
    for rank, r in enumerate(soak):
        assert r["memory"] is not None, f"rank {rank} did not finish: {r['error']}"
        baseline, end = r["memory"]
        assert end - baseline <= SLACK, (
            f"rank {rank}: device memory in use grew by {(end - baseline) / 2**20:.1f} MiB "
            f"({baseline / 2**20:.1f} -> {end / 2**20:.1f} MiB)"
        )
