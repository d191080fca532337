"""GPU tier: bad input to dispatch, combine and the low-latency calls on RANKS ranks (conftest), one case each.

Every case must be refused with the named error class and a message that names the problem; afterwards the
communicator must still give the oracle's results (nothing was corrupted), and every call on a closed communicator
is refused. All ranks make the same calls in the same order, so the collective parts (a dispatch's count exchange,
a low-latency call) stay in step; ids out of range are found on the device and reported through the asynchronous
error, which each case clears. The layout's own refusals are in test_gpu_layout.py, ranks that disagree on E and the
worst-case overflow in test_gpu_ht.py, a stale low-latency result in test_gpu_ll.py.
"""

import functools
import traceback

import numpy as np
import pytest
from conftest import (
    RANKS,
    SHARE_GPU,
    all_true,
    bf16_bits,
    bf16_values,
    exact_equal,
    gpu_tier_cupy,
    requires_ranks,
    spawn_ranks,
)

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(max(RANKS, 2))]
cupy = gpu_tier_cupy()

N, H, K, E = 64, 1024, 4, 16  # a valid call: N tokens per rank of hidden H, top-K of E experts
MAX_TOKENS, T = 256, 64  # the communicator's max_tokens_per_rank and low_latency_max_tokens


def inputs(rank, n=N, h=H, k=K, e=E, seed=0):
    rng = np.random.default_rng([seed, rank])
    topk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64)
    x = bf16_bits(rng.standard_normal((n, h)).astype(np.float32))
    return x, topk, rng.random((n, k)).astype(np.float32)


def outcome(comm, call):
    """'accepted', or the error class and message of a refused call (raised at once, or recorded on the device)."""
    try:
        call()
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        return "accepted"
    except pydeepep.DeepEPError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        cupy.cuda.runtime.deviceSynchronize()
        comm.clear_async_error()


def cases(comm, rank):
    """name -> the call to refuse (a closure over this rank's valid inputs, with one thing wrong)."""
    x_np, topk_np, w_np = inputs(rank)
    x, topk, w = cupy.asarray(x_np), cupy.asarray(topk_np), cupy.asarray(w_np)

    def dispatch(x=x, topk=topk, **kw):
        return lambda: comm.dispatch(x, topk_idx=topk, num_experts=kw.pop("num_experts", E), **kw)

    def ll_dispatch(x=x, topk=topk, **kw):
        return lambda: comm.low_latency_dispatch(x, topk, kw.pop("num_experts", E), **kw)

    def with_id(value):
        bad = topk_np.copy()
        bad[N // 2, 1] = value
        return cupy.asarray(bad)

    x_elsewhere = None  # ranks sharing one GPU (DEEPEP_TEST_SHARE_GPU) have no other GPU
    if not SHARE_GPU:
        with cupy.cuda.Device((rank + 1) % comm.nranks):
            x_elsewhere = cupy.asarray(x_np)
    big_x, big_topk, _ = inputs(rank, n=MAX_TOKENS, h=7168)
    many_x, many_topk, _ = inputs(rank, n=MAX_TOKENS + 1)
    ll_many_x, ll_many_topk, _ = inputs(rank, n=T + 1)
    wide_topk = inputs(rank, k=33, e=64)[1]
    fp8_x = cupy.zeros((N, 1000), cupy.uint8)
    fp8_scales = cupy.ones((N, 8), cupy.float32)
    done = comm.dispatch(x, topk_idx=topk, num_experts=E)  # for the handle cases
    delivered = cupy.asarray(done.recv_x)
    local = E // comm.nranks

    def ll_combine_with_rows(rows):
        # A fresh dispatch (collective), then a combine whose x does not have the dispatch's [E_loc, R * T, H].
        result = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
        return comm.low_latency_combine(cupy.zeros((local, rows, H), cupy.uint16), topk, w, result)

    return {
        "dtype": dispatch(x=x.astype(cupy.float32)),
        "topk_dtype": dispatch(topk=topk.astype(cupy.float32)),
        "shape": dispatch(x=x.reshape(-1)),
        "topk_rows": dispatch(topk=topk[:-1]),
        "stride": dispatch(x=cupy.asarray(bf16_bits(np.zeros((N, 2 * H), np.float32)))[:, ::2]),
        "host_memory": dispatch(x=x_np),
        **({} if x_elsewhere is None else {"other_device": dispatch(x=x_elsewhere)}),
        "id_at_e": dispatch(topk=with_id(E)),
        "id_below_minus_one": dispatch(topk=with_id(-2)),
        "ll_id_at_e": ll_dispatch(topk=with_id(E)),
        "ll_id_below_minus_one": ll_dispatch(topk=with_id(-2)),
        "fp8_hidden": dispatch(x=fp8_x, x_scales=fp8_scales),
        "k_above_32": dispatch(topk=cupy.asarray(wide_topk), num_experts=64),
        "ll_k_above_config": ll_dispatch(topk=cupy.asarray(inputs(rank, k=9)[1])),
        "ll_hidden_above_config": ll_dispatch(x=cupy.asarray(inputs(rank, n=8, h=2 * H)[0]), topk=topk[:8]),
        "ll_fp8_hidden": ll_dispatch(x=cupy.asarray(inputs(rank, h=1000)[0])),
        "tokens_above_max": dispatch(x=cupy.asarray(many_x), topk=cupy.asarray(many_topk)),
        "worst_tokens_above_max": dispatch(
            x=cupy.asarray(many_x), topk=cupy.asarray(many_topk), num_worst_tokens=2 * MAX_TOKENS
        ),
        "ll_tokens_above_max": ll_dispatch(x=cupy.asarray(ll_many_x), topk=cupy.asarray(ll_many_topk)),
        "buffer_too_small": dispatch(x=cupy.asarray(big_x), topk=cupy.asarray(big_topk)),
        "handle_other_tokens": lambda: comm.dispatch(x[: N // 2], topk_idx=topk[: N // 2], handle=done.handle),
        "handle_other_rows": lambda: comm.combine(delivered[:-1], done.handle),
        "alignment_past_int32": dispatch(expert_alignment=2**31 - 1),
        "bound_zero": dispatch(max_recv_tokens=0),
        "bound_and_worst": dispatch(max_recv_tokens=2 * N, num_worst_tokens=2 * N),
        "bound_with_out": dispatch(max_recv_tokens=2 * N, out=done),
        "ll_handle_other_rows": lambda: ll_combine_with_rows(comm.nranks * T - 1),
    }


# name -> (error class, words the message must hold)
EXPECTED = {
    "dtype": ("DeepEPInvalidArgument", ["x has dtype float32"]),
    "topk_dtype": ("DeepEPInvalidArgument", ["topk_idx has dtype float32"]),
    "shape": ("DeepEPInvalidArgument", ["x has shape", "2-D"]),
    "topk_rows": ("DeepEPInvalidArgument", [f"topk_idx has {N - 1} rows but x has {N}"]),
    "stride": ("DeepEPInvalidArgument", ["x has element strides", "contiguous"]),
    "host_memory": ("DeepEPInvalidArgument", ["expected a CUDA device array", "host data of type ndarray"]),
    "other_device": ("DeepEPInvalidArgument", ["x", "lives on device", "the communicator uses device"]),
    "id_at_e": ("DeepEPInvalidArgument", ["asynchronous error", "dispatch routing", f"has value {E}"]),
    "id_below_minus_one": ("DeepEPInvalidArgument", ["asynchronous error", "dispatch routing", "has value -2"]),
    "ll_id_at_e": ("DeepEPInvalidArgument", ["asynchronous error", "low-latency dispatch", f"has value {E}"]),
    "ll_id_below_minus_one": ("DeepEPInvalidArgument", ["asynchronous error", "low-latency dispatch", "has value -2"]),
    "fp8_hidden": ("DeepEPInvalidArgument", ["hidden is 1000", "multiple of 128"]),
    "k_above_32": ("DeepEPInvalidArgument", ["num_topk is 33", "[1, 32]"]),
    "ll_k_above_config": ("DeepEPInvalidArgument", ["num_topk is 9", "at most 4"]),
    "ll_hidden_above_config": ("DeepEPInvalidArgument", [f"hidden is {2 * H}", f"at most {H}"]),
    "ll_fp8_hidden": ("DeepEPInvalidArgument", ["hidden is 1000", "multiple of 128"]),
    "tokens_above_max": ("DeepEPInvalidArgument", [f"num_tokens is {MAX_TOKENS + 1}", f"= {MAX_TOKENS}"]),
    # Said so before the buffer's capacity for that many rows, which they also exceed.
    "worst_tokens_above_max": ("DeepEPInvalidArgument", [f"num_tokens is {MAX_TOKENS + 1}", f"= {MAX_TOKENS}"]),
    "ll_tokens_above_max": ("DeepEPInvalidArgument", [f"{T + 1} tokens", f"max_tokens ({T})"]),
    "buffer_too_small": ("DeepEPBufferTooSmall", ["need", "bytes of communication buffer", "this communicator has"]),
    "handle_other_tokens": ("DeepEPInvalidArgument", [f"num_tokens is {N // 2}", f"routing is for {N} tokens"]),
    "handle_other_rows": ("DeepEPInvalidArgument", ["x has", "rows but the handle's dispatch delivered"]),
    "alignment_past_int32": ("DeepEPInvalidArgument", ["expert_alignment is 2147483647", "must fit int32"]),
    "bound_zero": ("DeepEPInvalidArgument", ["max_recv_tokens is 0", "at least 1"]),
    "bound_and_worst": ("DeepEPInvalidArgument", ["num_worst_tokens and max_recv_tokens", "one of them"]),
    "bound_with_out": ("DeepEPInvalidArgument", ["max_recv_tokens", "out= is for"]),
    "ll_handle_other_rows": ("DeepEPInvalidArgument", ["x has shape", f"({E // RANKS}, {RANKS * T}, {H}) is needed"]),
}


def still_works(comm, rank, seed):
    """A dispatch + combine and a low-latency dispatch + combine after the refusals match the oracle. Every call is
    made before any comparison, so that a rank whose results differ still takes part in all of them."""
    R = comm.nranks
    data = [inputs(r, seed=seed) for r in range(R)]
    x, topk, w = (cupy.asarray(a) for a in data[rank])
    result = comm.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=E)
    combined = comm.combine(result.recv_x, result.handle)
    ll = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
    # Random expert outputs: ones would make every combine the sum of its weights, whatever rows it read.
    ll_ys = [bf16_bits(np.random.default_rng([seed, r, 1]).standard_normal((E // R, R * T, H))) for r in range(R)]
    out, _ = comm.low_latency_combine(cupy.asarray(ll_ys[rank]), topk, w, ll)
    cupy.cuda.runtime.deviceSynchronize()
    comm.check_async_error()

    want = reference.dispatch([bf16_values(d[0]) for d in data], [d[1] for d in data], [d[2] for d in data], E)
    ys = [want[r][0] for r in range(R)]  # each rank combines the rows it received (already BF16 values)
    want_out = reference.combine(ys, [want[r][4] for r in range(R)], [N] * R)[rank]
    want_ll = reference.low_latency_dispatch(
        [bf16_values(d[0]) for d in data], [d[1] for d in data], E, T, use_fp8=False
    )
    want_ll_out = reference.low_latency_combine(
        [bf16_values(y) for y in ll_ys],
        [d[1] for d in data],
        [d[2] for d in data],
        [wl[3] for wl in want_ll],
    )[rank]
    counts = want_ll[rank][2]
    received = [slice(0, int(c)) for c in counts]  # each local expert's rows; those past its count are not written

    def rows_of(array):
        return np.concatenate([array[le, rows] for le, rows in enumerate(received)])

    checks = {
        "dispatch": (bf16_values(result.recv_x.to_numpy()), want[rank][0]),
        "combine": (bf16_values(combined.out.to_numpy()), want_out),
        "low-latency counts": (ll.recv_count.to_numpy(), counts),
        "low-latency rows": (rows_of(bf16_values(ll.recv_x.to_numpy())), rows_of(want_ll[rank][0])),
        "low-latency source tokens": (rows_of(ll.recv_src_info.to_numpy() & 0xFFFF), rows_of(want_ll[rank][3][..., 1])),
        "low-latency combine": (bf16_values(out.to_numpy()), want_ll_out),
    }
    for what, (got, expected) in checks.items():
        if not exact_equal(got, expected):
            return f"{what} differs from the oracle"
    return True


def oracle_dispatch(info):
    """The reference dispatch of every rank's inputs(): this rank's results (recv_x values first)."""
    xs = [bf16_values(inputs(r)[0]) for r in range(info.nranks)]
    return reference.dispatch(xs, [inputs(r)[1] for r in range(info.nranks)], None, E)[info.rank]


def open_communicator(info, **extra):
    """This rank's communicator for the valid call's shapes (a 20 s timeout: a peer that hangs fails the case)."""
    return pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=20,
        max_tokens_per_rank=MAX_TOKENS,
        hidden=H,
        num_topk=K,
        num_experts=E,
        **extra,
    )


def bad_input_rank(info):
    out = {}
    comm = open_communicator(info, low_latency_max_tokens=T)
    try:
        with cupy.cuda.Device(comm.device):
            for name, call in cases(comm, info.rank).items():
                out[name] = outcome(comm, call)
            try:
                out["still_works"] = still_works(comm, info.rank, seed=5)
            except Exception:
                out["still_works"] = traceback.format_exc()
            x, topk, w = (cupy.asarray(a) for a in inputs(info.rank))
            handle = comm.dispatch(x, topk_idx=topk, num_experts=E)
            ll = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
            y = cupy.zeros((E // comm.nranks, comm.nranks * T, H), cupy.uint16)
    finally:
        comm.close()
    with cupy.cuda.Device(info.device):
        closed = {
            "closed_dispatch": lambda: comm.dispatch(x, topk_idx=topk, num_experts=E),
            "closed_combine": lambda: comm.combine(handle.recv_x, handle.handle),
            "closed_ll_dispatch": lambda: comm.low_latency_dispatch(x, topk, E),
            "closed_ll_combine": lambda: comm.low_latency_combine(y, topk, w, ll),
        }
        for name, call in closed.items():
            try:
                call()
                out[name] = "accepted"
            except pydeepep.DeepEPError as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(bad_input_rank, nprocs=RANKS, timeout=150 * RANKS)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_is_refused_with_a_message_naming_the_problem(results, case):
    if case == "other_device" and SHARE_GPU:
        pytest.skip("the ranks share one GPU (DEEPEP_TEST_SHARE_GPU): there is no other GPU's memory")
    kind, words = EXPECTED[case]
    for rank, r in enumerate(results):
        got = r.get(case, "not run")
        assert got.startswith(kind + ":"), f"rank {rank}: {got}"
        for word in words:
            assert word in got, f"rank {rank}: {word!r} not in {got!r}"


def test_the_communicator_still_matches_the_oracle_after_the_refusals(results):
    assert all_true([r.get("still_works") for r in results]), [r.get("still_works") for r in results]


@pytest.mark.parametrize("call", ["closed_dispatch", "closed_combine", "closed_ll_dispatch", "closed_ll_combine"])
def test_every_call_after_close_is_refused(results, call):
    for rank, r in enumerate(results):
        assert r.get(call) == "DeepEPInvalidUsage: the communicator is closed", f"rank {rank}: {r.get(call)}"


def recorded_fault_rank(info):
    """Rank 0 records a fault of its own (an expert id out of range in a layout) and leaves it; then every rank makes
    a full dispatch (a count exchange). Returns what that dispatch raised, how long it took, and whether one after
    clearing the fault gives the oracle's rows."""
    import time

    with open_communicator(info) as comm:
        with cupy.cuda.Device(comm.device):
            x_np, topk_np, _ = inputs(info.rank)
            x, topk = cupy.asarray(x_np), cupy.asarray(topk_np)
            if info.rank == 0:
                bad = topk_np.copy()
                bad[0, 0] = E
                comm.get_dispatch_layout(cupy.asarray(bad), E)
                cupy.cuda.runtime.deviceSynchronize()
            start = time.monotonic()
            try:
                comm.dispatch(x, topk_idx=topk, num_experts=E)
                first = "accepted"
            except pydeepep.DeepEPError as exc:
                first = f"{type(exc).__name__}: {exc}"
            seconds = time.monotonic() - start
            cupy.cuda.runtime.deviceSynchronize()
            comm.clear_async_error()
            recv_x = comm.dispatch(x, topk_idx=topk, num_experts=E).recv_x.to_numpy()
            cupy.cuda.runtime.deviceSynchronize()
            comm.check_async_error()
    return first, seconds, exact_equal(bf16_values(recv_x), oracle_dispatch(info)[0])


def test_a_count_exchange_is_refused_while_a_fault_is_recorded():
    """Not after its exchange ran with the old fault ending the host's wait at once: refused up front, the other
    ranks told at once (not at their timeout), and all of them in step for the next call once it is cleared."""
    results = spawn_ranks(recorded_fault_rank, nprocs=RANKS, timeout=60 * RANKS)
    first, seconds, again = results[0]
    assert first.startswith("DeepEPInvalidUsage:") and "asynchronous error is recorded" in first, first
    assert "deepepCommClearAsyncError" in first, first
    for rank, (first, seconds, again) in enumerate(results):
        if rank > 0:
            assert first.startswith("DeepEPRemoteError:"), f"rank {rank}: {first}"
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s (its timeout is 20)"
        assert again is True, f"rank {rank}: the dispatch after clearing the fault differs from the oracle"


# Holds a stream for `ns` nanoseconds (%globaltimer), so that work queued after it runs while a later call waits.
SPIN_SOURCE = r"""
extern "C" __global__ void spin(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}
"""


def fault_during_the_wait_rank(info):
    """Every rank makes a full dispatch first (so that the one below pays no first-call costs). Then rank 0 queues a
    kernel that holds its stream for 1.5 s, a layout with an expert id out of range (which records its fault once it
    runs, while the count exchange below already waits) and a full dispatch, which the other ranks make at once.
    Then every rank makes a full dispatch with an id out of range of its own, and a valid one. Returns whether the
    valid dispatches gave the oracle's rows, what check_async_error raised after the first, the seconds it took, and
    what the one with the bad id raised."""
    import time

    with open_communicator(info) as comm, cupy.cuda.Device(comm.device):
        x_np, topk_np, _ = inputs(info.rank)
        x, topk = cupy.asarray(x_np), cupy.asarray(topk_np)
        stream = cupy.cuda.Stream(non_blocking=True)
        bad = cupy.asarray(topk_np)
        bad[0, 0] = E
        spin = cupy.RawKernel(SPIN_SOURCE, "spin")
        comm.dispatch(x, topk_idx=topk, num_experts=E, stream=stream)
        stream.synchronize()
        start = time.monotonic()
        if info.rank == 0:
            with stream:
                spin((1,), (1,), (np.uint64(1_500_000_000),))
            comm.get_dispatch_layout(bad, E, stream=stream)
        try:
            recv_x = comm.dispatch(x, topk_idx=topk, num_experts=E, stream=stream).recv_x.to_numpy()
            stream.synchronize()
        except pydeepep.DeepEPError as exc:
            seconds = time.monotonic() - start
            return f"the dispatch raised after {seconds:.2f} s {type(exc).__name__}: {exc}", None, seconds, None
        seconds = time.monotonic() - start
        try:
            comm.check_async_error()
            afterwards = "nothing"
        except pydeepep.DeepEPError as exc:
            afterwards = type(exc).__name__
        comm.clear_async_error()
        # An id out of range in the call's own routing is the call's fault: every rank's dispatch raises it itself.
        try:
            comm.dispatch(x, topk_idx=bad, num_experts=E, stream=stream)
            stream.synchronize()
            own = "accepted"
        except pydeepep.DeepEPError as exc:
            own = type(exc).__name__
        comm.clear_async_error()
        again = comm.dispatch(x, topk_idx=topk, num_experts=E, stream=stream).recv_x.to_numpy()
        comm.check_async_error()
    want = oracle_dispatch(info)[0]
    rows_match = all(np.array_equal(bf16_values(rows), want) for rows in (recv_x, again))
    return rows_match, afterwards, seconds, own


def test_a_count_exchange_reports_its_own_outcome_when_earlier_work_records_a_fault_meanwhile():
    """The fault of work queued before the call, recorded while the call waits for its counts, does not end that
    wait: the dispatch completes on every rank with the oracle's rows, and the fault is there to read afterwards. An
    id out of range in a call's own routing still fails that call, and the ranks stay in step."""
    results = spawn_ranks(fault_during_the_wait_rank, nprocs=RANKS, timeout=60 * RANKS)
    for rank, (rows_match, afterwards, seconds, own) in enumerate(results):
        assert rows_match is True, f"rank {rank}: {rows_match}"
        assert afterwards == ("DeepEPInvalidArgument" if rank == 0 else "nothing"), f"rank {rank}: {afterwards}"
        assert own == "DeepEPInvalidArgument", f"rank {rank}: a dispatch with an id out of range gave {own}"
        assert seconds < 10, f"rank {rank} took {seconds:.1f} s (its timeout is 20)"
    # The premise: rank 0's stream was held while its call waited (else the fault was there before the call).
    assert results[0][2] > 1.4, f"rank 0's dispatch took {results[0][2]:.2f} s; the spin holds its stream 1.5 s"


def bad_id_on_one_rank(info):
    """Rank 0 makes a full, then a bounded dispatch, then a worst-case dispatch and a combine with an expert id out of
    range while the others make the same with valid ones; then every rank a valid full dispatch. Returns what each of
    the first three raised (the class name, or "accepted"), the seconds they took, whether the last one gave the
    oracle's rows, and what differs in the worst-case dispatch and its combine from the oracle's routing with the bad
    slot skipped (None when nothing does)."""
    import time

    with open_communicator(info) as comm, cupy.cuda.Device(comm.device):
        x_np, topk_np, _ = inputs(info.rank)
        x, topk = cupy.asarray(x_np), cupy.asarray(topk_np)
        bad = cupy.asarray(topk_np)
        bad[0, 0] = E
        ids = bad if info.rank == 0 else topk
        comm.dispatch(x, topk_idx=topk, num_experts=E)  # first-call costs out of the timed calls
        said, seconds = [], []

        worst = {}

        def worst_case_then_combine():
            result = comm.dispatch(x, topk_idx=ids, num_experts=E, num_worst_tokens=info.nranks * N)
            worst["rows"], worst["out"] = result.recv_x, comm.combine(result.recv_x, result.handle).out

        calls = (
            functools.partial(comm.dispatch, x, topk_idx=ids, num_experts=E),
            functools.partial(comm.dispatch, x, topk_idx=ids, num_experts=E, max_recv_tokens=info.nranks * N),
            worst_case_then_combine,
        )
        for call in calls:
            start = time.monotonic()
            said.append(outcome(comm, call).split(":")[0])  # the class name, or "accepted"
            seconds.append(time.monotonic() - start)
        rows = comm.dispatch(x, topk_idx=topk, num_experts=E).recv_x.to_numpy()
        comm.check_async_error()
        worst_rows, worst_out = (bf16_values(worst[key].to_numpy()) for key in ("rows", "out"))
    want = oracle_dispatch(info)[0]
    # The worst-case dispatch skips the bad slot and moves the other rows; its combine sums them back.
    data = [inputs(r) for r in range(info.nranks)]
    data[0][1][0, 0] = -1
    skipped = reference.dispatch([bf16_values(d[0]) for d in data], [d[1] for d in data], None, E)
    want_out = reference.combine([w[0] for w in skipped], [w[4] for w in skipped], [N] * info.nranks)[info.rank]
    m = skipped[info.rank][0].shape[0]
    worst_differs = None
    if not exact_equal(worst_rows[:m], skipped[info.rank][0]):
        worst_differs = "the worst-case rows"
    elif not exact_equal(worst_out, want_out):
        tokens = np.nonzero(np.any(worst_out.view(np.uint32) != want_out.view(np.uint32), axis=1))[0]
        t = tokens[0]
        worst_differs = (
            f"the combine after the worst-case dispatch (tokens {tokens[:8].tolist()}, {len(tokens)} of {N}; token "
            f"{t}: {worst_out[t, :4].tolist()} where the oracle has {want_out[t, :4].tolist()})"
        )
    return said, seconds, bool(np.array_equal(bf16_values(rows), want)), worst_differs


def test_a_bad_id_on_one_rank_fails_the_count_exchange_on_every_rank_at_once():
    """A full and a bounded dispatch (whose hosts wait for the counts): rank 0 raises DeepEPInvalidArgument, the others
    DeepEPRemoteError (its count message says it failed), none waits for a call that rank 0 never makes. A worst-case
    dispatch (no host wait) and the combine after it: rank 0 reads DeepEPInvalidArgument afterwards, the others
    complete, and so does every rank's combine. Afterwards all ranks dispatch in step."""
    results = spawn_ranks(bad_id_on_one_rank, nprocs=RANKS, timeout=60 * RANKS)
    for rank, (said, seconds, in_step, worst_differs) in enumerate(results):
        peers = ("DeepEPRemoteError", "DeepEPRemoteError", "accepted")
        want = ("DeepEPInvalidArgument",) * 3 if rank == 0 else peers
        for kind, got, expected in zip(("full", "bounded", "worst-case + combine"), said, want, strict=True):
            assert got == expected, f"rank {rank}: the {kind} call gave {got}"
        assert max(seconds) < 5, f"rank {rank} took {seconds} s (its timeout is 20)"
        assert in_step is True, f"rank {rank}: the dispatch afterwards differs from the oracle"
        assert worst_differs is None, f"rank {rank}: {worst_differs} differ from the oracle's with the bad slot skipped"


def outputs_refused_after_the_counts_rank(info):
    """Every rank makes a full dispatch; rank 0 passes out= arrays with too few rows, which only the count exchange
    shows to be wrong; then every rank a valid full dispatch. Returns what the first raised, the seconds it took, and
    whether the next one gave the oracle's rows."""
    import time

    with open_communicator(info) as comm, cupy.cuda.Device(comm.device):
        x_np, topk_np, _ = inputs(info.rank)
        x, topk = cupy.asarray(x_np), cupy.asarray(topk_np)
        small = comm.dispatch(x[:4], topk_idx=topk[:4], num_experts=E)  # out= arrays of another row count
        start = time.monotonic()
        said = outcome(
            comm, lambda: comm.dispatch(x, topk_idx=topk, num_experts=E, out=small if info.rank == 0 else None)
        )
        seconds = time.monotonic() - start
        again = comm.dispatch(x, topk_idx=topk, num_experts=E).recv_x.to_numpy()
        comm.check_async_error()
    want = oracle_dispatch(info)[0]
    return said, seconds, bool(np.array_equal(bf16_values(again), want))


def assert_refused_by_rank_0(rank, call, said, seconds, error, words):
    """Rank 0 raised `error` with `words` in its message, every other rank DeepEPRemoteError, each within 5 s (the
    communicators' timeout is 20 s: a rank left waiting would take that long)."""
    where = f"rank {rank}{', ' + call if call else ''}"
    if rank == 0:
        assert said.startswith(error) and words in said, f"{where}: {said}"
    else:
        assert said.startswith("DeepEPRemoteError") and "rank 0 refused the call" in said, f"{where}: {said}"
    assert seconds < 5, f"{where} took {seconds:.1f} s (its timeout is 20)"


def test_outputs_refused_after_the_count_exchange_fail_the_dispatch_on_every_rank_at_once():
    """The binding checks out= arrays against the counts, after the exchange: rank 0 refuses the dispatch that goes
    with them, and launches its side of it, so that the other ranks' dispatch fails at once with DeepEPRemoteError
    instead of waiting for rank 0 until the timeout; then all go on in step."""
    results = spawn_ranks(outputs_refused_after_the_counts_rank, nprocs=RANKS, timeout=60 * RANKS)
    for rank, (said, seconds, again_ok) in enumerate(results):
        assert_refused_by_rank_0(rank, "", said, seconds, "DeepEPInvalidArgument", "out recv_x has shape")
        assert again_ok, f"rank {rank}: the dispatch afterwards differs from the oracle"


def unreadable_stream_rank(info):
    """Every rank makes a full dispatch, a combine, a low-latency dispatch and a low-latency combine; for each, rank 0
    passes a stream that is no stream (each refused call followed by a valid one, so that the next has its inputs);
    then every rank a valid full dispatch. Returns what each refused call raised and the seconds it took, and whether
    the last dispatch gave the oracle's rows."""
    import time

    def timed(call):
        start = time.monotonic()
        try:
            said = outcome(comm, call)
        except TypeError as exc:
            said = f"TypeError: {exc}"
        return said, time.monotonic() - start

    with open_communicator(info, low_latency_max_tokens=T) as comm, cupy.cuda.Device(comm.device):
        x_np, topk_np, w_np = inputs(info.rank)
        x, topk, w = cupy.asarray(x_np), cupy.asarray(topk_np), cupy.asarray(w_np)
        stream = "not a stream" if info.rank == 0 else None
        said = {"dispatch": timed(lambda: comm.dispatch(x, topk_idx=topk, num_experts=E, stream=stream))}
        done = comm.dispatch(x, topk_idx=topk, num_experts=E)
        said["combine"] = timed(lambda: comm.combine(done.recv_x, done.handle, stream=stream))
        said["ll_dispatch"] = timed(lambda: comm.low_latency_dispatch(x, topk, E, use_fp8=False, stream=stream))
        ll = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
        y = cupy.zeros((E // comm.nranks, comm.nranks * T, H), cupy.uint16)
        said["ll_combine"] = timed(lambda: comm.low_latency_combine(y, topk, w, ll, stream=stream))
        again = comm.dispatch(x, topk_idx=topk, num_experts=E).recv_x.to_numpy()
        comm.check_async_error()
    return said, bool(np.array_equal(bf16_values(again), oracle_dispatch(info)[0]))


def test_a_stream_that_is_no_stream_on_one_rank_fails_the_call_on_every_rank_at_once():
    """docs/python-api.md: an argument of the wrong type raises TypeError, and a collective call still ends on every
    rank. Rank 0's call cannot run on the stream it names: its refusal runs on the stream of its last call, so that
    the other ranks' call fails at once with DeepEPRemoteError instead of waiting for rank 0 until the timeout."""
    results = spawn_ranks(unreadable_stream_rank, nprocs=RANKS, timeout=60 * RANKS)
    for rank, (said, again_ok) in enumerate(results):
        for call, (message, seconds) in said.items():
            assert_refused_by_rank_0(rank, call, message, seconds, "TypeError", "cannot take a CUDA stream from str")
        assert again_ok, f"rank {rank}: the dispatch afterwards differs from the oracle"
