"""GPU tier: high-throughput dispatch and combine on RANKS ranks (conftest: 2 unless DEEPEP_TEST_RANKS says
otherwise) against the NumPy oracle, bit for bit.

Every rank builds every rank's inputs from the same seeds (the oracle needs them all), runs its part on the GPU and
compares its own outputs. All scenarios run in one job; each test asserts on its scenario. A peer that skips a call
is tested between 2 ranks.
"""

import functools
import time
import traceback
import types

import numpy as np
import pytest
from conftest import (
    RANKS,
    all_true,
    bf16_bits,
    bf16_values,
    exact_equal,
    gpu_tier_cupy,
    log_scenario,
    one_rank_refusal_failures,
    requires_ranks,
    spawn_ranks,
)

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(max(RANKS, 2))]
cupy = gpu_tier_cupy()

MAX_TOKENS = 4096


def make_inputs(seed, rank, n, h, k, e, fp8=False, ue8m0=False, to_rank=None, drop=0.2, nranks=2):
    rng = np.random.default_rng([seed, rank])
    if n:
        topk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64)
    else:
        topk = np.zeros((0, k), np.int64)
    if to_rank is not None:  # every token's experts live on one rank
        local = e // nranks
        topk = np.stack([to_rank * local + rng.choice(local, size=k, replace=False) for _ in range(n)])
    topk[rng.random(topk.shape) < drop] = -1
    weights = rng.random((n, k)).astype(np.float32)
    if fp8:
        q_bits = rng.integers(0, 256, size=(n, h), dtype=np.uint8)
        q_bits[(q_bits & 0x7F) == 0x7F] = 0  # no NaN patterns
        if ue8m0:
            scales = rng.integers(100, 150, size=(n, (h // 128 + 3) // 4 * 4), dtype=np.int32).astype(np.uint8)
            scales = scales.view(np.int32).reshape(n, -1) if n else np.zeros((0, (h // 128 + 3) // 4), np.int32)
        else:
            scales = rng.random((n, h // 128)).astype(np.float32)
        return (q_bits, scales), topk, weights
    x_bits = bf16_bits(rng.standard_normal((n, h)).astype(np.float32))
    return x_bits, topk, weights


def dev(a):
    return cupy.asarray(a)


def wider(host, extra, fill):
    """`host` [rows, cols] on the device as the first cols columns of an array `extra` columns wider whose other
    columns hold `fill`: rows `cols + extra` elements apart, with something else between them to read by mistake."""
    rows, cols = host.shape
    wide = cupy.full((rows, cols + extra), fill, dtype=host.dtype)
    wide[:, :cols] = dev(host)
    return wide[:, :cols]


def run_case(
    comm,
    seed,
    n,
    h,
    k,
    e,
    fp8=False,
    ue8m0=False,
    alignment=1,
    biases=0,
    strided=False,
    worst=0,
    bound=0,
    to_rank=None,
    weights=True,
    num_sms=0,
    reruns=0,
    strided_topk=False,
    cancelling_biases=False,
):
    """Dispatch then combine one case; returns True or a description of the first mismatch. `strided` (True: 16, or
    a number of elements): payload rows that many elements apart from the row length (FP8: bytes, scale rows 3
    columns apart from theirs too); `strided_topk`: topk_idx and topk_weights rows apart from theirs as well;
    `cancelling_biases`: expert rows of magnitudes 1 to 2^24, bias 0 minus the BF16 of their sum and bias 1 small,
    so that each output is what the float32 additions in the documented order left over (standard normal BF16 values
    add up exactly in any order, so the other cases cannot tell the order)."""
    R, me = comm.nranks, comm.rank
    ns = [n(r) if callable(n) else n for r in range(R)]
    inputs = [make_inputs(seed, r, ns[r], h, k, e, fp8, ue8m0, to_rank, nranks=R) for r in range(R)]
    x_mine, topk_mine, w_mine = inputs[me]
    # FP8 rows go to the oracle as their bits (it copies rows unchanged), so that the payload compares bit for bit.
    xs_oracle = [x if fp8 else bf16_values(x) for x, _, _ in inputs]
    want = reference.dispatch(
        xs_oracle, [t for _, t, _ in inputs], [w for _, _, w in inputs] if weights else None, e, alignment
    )
    pad = 16 if strided is True else int(strided)
    with cupy.cuda.Device(comm.device):
        if fp8:
            x_dev, scales_dev = dev(x_mine[0]), dev(x_mine[1])
            if pad:  # payload rows `pad` bytes apart from the row length, scale rows 3 columns (words) apart
                x_dev = wider(x_mine[0], pad, 0x55)
                scales_dev = wider(x_mine[1], 3, x_mine[1].dtype.type(0x7F7F7F7F if ue8m0 else 7.0))
        else:
            x_dev, scales_dev = dev(x_mine), None
            if pad:  # rows `pad` elements apart from the row length
                x_dev = wider(x_mine, pad, 0x4480)  # BF16 1024.0 between the rows
        if strided_topk:  # an expert id and a weight that no row holds between the rows
            topk_dev = wider(topk_mine, 3, e - 1)
            w_dev = wider(w_mine, 5, np.float32(7.0)) if weights else None
        else:
            topk_dev, w_dev = dev(topk_mine), dev(w_mine) if weights else None
        if pad and x_dev.strides[0] == x_dev.shape[1] * x_dev.itemsize and x_dev.shape[0] > 1:
            return "the strided payload is contiguous: the case tests nothing"
        result = comm.dispatch(
            x_dev,
            x_scales=scales_dev,
            topk_idx=topk_dev,
            topk_weights=w_dev,
            num_experts=e,
            expert_alignment=alignment,
            num_worst_tokens=worst,
            max_recv_tokens=bound or None,
            num_sms=num_sms,
        )
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        exp_x, exp_idx, exp_w, exp_counts, exp_src = want[me]
        m = exp_src.shape[0]
        rows = worst if worst else m
        if result.recv_x.shape[0] != rows:
            return f"recv_x has {result.recv_x.shape[0]} rows, expected {rows}"
        if fp8:
            if not exact_equal(result.recv_x.to_numpy()[:m], exp_x[0]):  # bits against bits
                return "FP8 payload differs"
            if not exact_equal(result.recv_scales.to_numpy()[:m], exp_x[1]):
                return "FP8 scales differ"
        elif not exact_equal(bf16_values(result.recv_x.to_numpy()[:m]), exp_x):
            return "BF16 payload differs"
        src = result.recv_src_idx.to_numpy()
        if not np.array_equal(src[:m], exp_src[:, 1]):
            return "recv_src_idx differs"
        if not np.array_equal(result.recv_topk_idx.to_numpy()[:m], exp_idx):
            return "recv_topk_idx differs"
        if weights and not exact_equal(result.recv_topk_weights.to_numpy()[:m], exp_w):
            return "recv_topk_weights differ"
        if bound and not np.array_equal(cupy.from_dlpack(result.recv_src_idx).get(), exp_src[:, 1]):
            return "the first rows of the bounded outputs export other data through DLPack"
        if worst:
            if not (np.all(src[m:] == -1) and np.all(result.recv_topk_idx.to_numpy()[m:] == -1)):
                return "worst-case padding rows are not marked with -1"
            if weights and np.any(result.recv_topk_weights.to_numpy()[m:] != 0):
                return "worst-case padding rows have weights other than 0"
            if result.num_recv_tokens_per_expert != []:
                return f"worst-case mode gave per-expert counts {result.num_recv_tokens_per_expert}, not []"
        elif result.num_recv_tokens_per_expert != [int(c) for c in exp_counts]:
            return f"per-expert counts {result.num_recv_tokens_per_expert} != {list(exp_counts)}"

        # Combine: fresh BF16 rows in receive order on every rank.
        def combine_values(key, shape, magnitudes=None):
            """BF16 bits of standard normal values, times 2^m for m drawn from `magnitudes` (lowest, highest)."""
            rng = np.random.default_rng(key)
            values = rng.standard_normal(shape)
            if magnitudes:
                values *= 2.0 ** rng.integers(magnitudes[0], magnitudes[1] + 1, size=shape)
            return bf16_bits(values.astype(np.float32))

        ms = [w[4].shape[0] for w in want]
        spread = (0, 24) if cancelling_biases else None
        ys_bits = [combine_values([seed, 99, r], (ms[r], h), spread) for r in range(R)]
        yw = [np.random.default_rng([seed, 98, r]).random((ms[r], k)).astype(np.float32) for r in range(R)]
        ys_oracle, srcs = [bf16_values(y) for y in ys_bits], [w[4] for w in want]
        if cancelling_biases:
            sums = reference.combine(ys_oracle, srcs, ns)
            small = [combine_values([seed, 97, r, 1], (ns[r], h), (-8, -4)) for r in range(R)]
            bias_bits = [[bf16_bits(-sums[r]), small[r]] for r in range(R)]
        else:
            bias_bits = [[combine_values([seed, 97, r, i], (ns[r], h)) for i in range(biases)] for r in range(R)]
        want_out = reference.combine(
            ys_oracle, srcs, ns, [tuple(bf16_values(b) for b in bb) for bb in bias_bits], topk_weights=yw
        )
        if cancelling_biases:  # the data must tell the documented order from another: the biases the other way round
            swapped = reference.combine(
                ys_oracle, srcs, ns, [tuple(bf16_values(b) for b in bb[::-1]) for bb in bias_bits]
            )
            if exact_equal(swapped[me], want_out[me][0]):
                return "the combine's data sum alike in another order: the case tests nothing"
        y_dev = cupy.zeros((rows, h), cupy.uint16)
        y_dev[:m] = dev(ys_bits[me])
        yw_dev = cupy.zeros((rows, k), cupy.float32)
        yw_dev[:m] = dev(yw[me])
        bias_dev = tuple(dev(b) for b in bias_bits[me])
        out, out_w, _ = comm.combine(y_dev, result.handle, topk_weights=yw_dev, bias=bias_dev or None)
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        if not exact_equal(bf16_values(out.to_numpy()), want_out[me][0]):
            return "combine output differs"
        if not exact_equal(out_w.to_numpy(), want_out[me][1]):
            return "combined weights differ"

        # Cached dispatch with new data, same routing, and reruns bitwise identical (recv_x copied first: on a
        # zero-copy communicator every dispatch's recv_x views the same area).
        names = ("recv_x", "recv_scales", "recv_topk_idx", "recv_topk_weights")
        first = {name: getattr(result, name) for name in names}
        first = {name: None if a is None else a.to_numpy() for name, a in first.items()}
        first_out = out.to_numpy()
        if reruns:
            # New data: every payload negated (the sign bit, exact in BF16 and FP8), so that a cached dispatch that
            # moved nothing cannot pass for one that moved the same rows again.
            sign = 0x80 if fp8 else 0x8000
            negated = comm.dispatch(
                x_dev ^ sign, x_scales=scales_dev, topk_idx=topk_dev, topk_weights=w_dev, handle=result.handle
            )
            if not np.array_equal(negated.recv_x.to_numpy()[:m], first["recv_x"][:m] ^ sign):
                return "a cached dispatch of new data did not deliver it"
        for i in range(reruns):
            again = comm.dispatch(
                x_dev, x_scales=scales_dev, topk_idx=topk_dev, topk_weights=w_dev, handle=result.handle
            )
            out2 = comm.combine(y_dev, result.handle, topk_weights=yw_dev, bias=bias_dev or None).out
            for name, was in first.items():
                got = getattr(again, name)
                if (got is None) != (was is None) or (was is not None and not exact_equal(got.to_numpy(), was)):
                    return f"rerun {i}: {name} differs"
            if not exact_equal(out2.to_numpy(), first_out):  # the bits
                return f"rerun {i}: the combine output differs"
    return True


def identity_experts_out(x_bits, topk, e, nranks):
    """What a dispatch, identity experts and a combine give back: each token times the number of ranks it reached,
    summed from +0.0 as the combine's sum is (a token that reached no rank is +0.0, not x * 0)."""
    reached = reference.dispatch_layout(topk, e, nranks)[2].sum(axis=1).astype(np.float32)
    return reference.bf16_round(np.float32(0) + bf16_values(x_bits) * reached[:, None])


def graph_case(comm, seed):
    """Cached dispatch + combine captured in a CUDA graph, replayed with new data."""
    from pydeepep.bench import CapturedGraph

    R, me, n, h, k, e = comm.nranks, comm.rank, 256, 512, 4, 16
    with cupy.cuda.Device(comm.device):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x0, topk, w = make_inputs(seed, me, n, h, k, e)
            x_dev, topk_dev = dev(x0), dev(topk)
            first = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e, stream=stream)
            handle, rows = first.handle, first.recv_x.shape[0]
            y_dev = cupy.zeros((rows, h), cupy.uint16)

            # Outputs allocated once, outside the capture, and passed as out=.
            d_out = comm.dispatch(x_dev, topk_idx=topk_dev, handle=handle, stream=stream)
            c_out = comm.combine(y_dev, handle, stream=stream)

            def step():
                comm.dispatch(x_dev, topk_idx=topk_dev, handle=handle, stream=stream, out=d_out)
                # Expert "computation": identity (a device copy, legal inside the capture).
                cupy.cuda.runtime.memcpyAsync(y_dev.data.ptr, d_out.recv_x.ptr, d_out.recv_x.nbytes, 3, stream.ptr)
                comm.combine(y_dev, handle, stream=stream, out=c_out)

            graph = CapturedGraph(step, stream.ptr)
            results = []
            for trial in range(3):
                new = [make_inputs(seed + 1 + trial, r, n, h, k, e)[0] for r in range(R)]
                x_dev[...] = dev(new[me])
                graph.launch()
                stream.synchronize()
                want = identity_experts_out(new[me], topk, e, R)
                results.append(exact_equal(bf16_values(c_out[0].to_numpy()), want))
            graph.close()
    comm.check_async_error()
    return all(results) or f"replays matched: {results}"


def captured_handles_case(comm, seed, n=128, h=256, k=4, e=16):
    """The rule for handles in CUDA graphs (deepep.h): a handle routed outside and captured with a cached dispatch +
    combine still serves cached calls outside the graph; routing it again outside (a worst-case dispatch with
    handle=) is refused with DeepEPInvalidUsage on every rank, and so is a combine outside the graph with a handle
    that a captured worst-case dispatch routed. The refusals launch this rank's side of the call: the ranks stay in
    step, and the graph and a dispatch + combine afterwards still match the oracle."""
    from pydeepep.bench import CapturedGraph

    R, me = comm.nranks, comm.rank
    x, topk, _ = make_inputs(seed, me, n, h, k, e, nranks=R)
    want = identity_experts_out(x, topk, e, R)

    def same(out):  # after the work queued on `stream`
        stream.synchronize()
        return exact_equal(bf16_values(out.to_numpy()), want)

    failures = []
    with cupy.cuda.Device(comm.device), cupy.cuda.Stream(non_blocking=True) as stream:
        # CuPy arrays made and exported under `stream` name it as their producer: a capture on it waits for no other.
        x_dev, topk_dev = dev(x), dev(topk)
        handle = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e, stream=stream).handle
        d_out = comm.dispatch(x_dev, handle=handle, stream=stream)
        c_out = comm.combine(d_out.recv_x, handle, stream=stream)

        def cached_step():
            comm.dispatch(x_dev, handle=handle, stream=stream, out=d_out)
            comm.combine(d_out.recv_x, handle, stream=stream, out=c_out)

        graph = CapturedGraph(cached_step, stream.ptr)
        graph.launch()
        if not same(c_out[0]):
            failures.append("the replay differs")
        again = comm.dispatch(x_dev, handle=handle, stream=stream)
        if not same(comm.combine(again.recv_x, handle, stream=stream).out):
            failures.append("a cached dispatch + combine outside the graph differs")
        said = refusal(
            comm,
            pydeepep.DeepEPInvalidUsage,
            comm.dispatch,
            x_dev,
            topk_idx=topk_dev,
            num_experts=e,
            handle=handle,
            num_worst_tokens=R * n,
            stream=stream,
        )
        if not refused_with(said, pydeepep.DeepEPInvalidUsage, "route again a handle that a CUDA graph capture used"):
            failures.append(f"routing the captured handle again outside the graph: {said}")
        graph.launch()  # the handle kept the routing the graph reads
        if not same(c_out[0]):
            failures.append("the replay after the refusal differs")
        graph.close()

        # A handle routed by a worst-case dispatch inside the capture belongs to the graph.
        worst = pydeepep.Handle(comm)
        w_out = comm.dispatch(
            x_dev, topk_idx=topk_dev, num_experts=e, handle=worst, num_worst_tokens=R * n, stream=stream
        )
        wc_out = comm.combine(w_out.recv_x, worst, stream=stream)

        def worst_step():
            comm.dispatch(
                x_dev, topk_idx=topk_dev, num_experts=e, handle=worst, num_worst_tokens=R * n, stream=stream, out=w_out
            )
            comm.combine(w_out.recv_x, worst, stream=stream, out=wc_out)

        graph = CapturedGraph(worst_step, stream.ptr)
        graph.launch()
        if not same(wc_out[0]):
            failures.append("the worst-case replay differs")
        said = refusal(comm, pydeepep.DeepEPInvalidUsage, comm.combine, w_out.recv_x, worst, stream=stream)
        if not refused_with(said, pydeepep.DeepEPInvalidUsage, "routed by a dispatch captured in a CUDA graph"):
            failures.append(f"a combine outside the graph with the handle it routes: {said}")
        graph.close()
    verdict = run_case(comm, seed + 1, n=200, h=512, k=k, e=e)
    if verdict is not True:
        failures.append(f"after the refusals: {verdict}")
    return "; ".join(failures) if failures else True


def allocator_case(comm, seed, n=128, h=256, k=4, e=16):
    """out= as an allocator: an exact-size dispatch calls it once, with the rows the count exchange gave, and writes
    into the arrays it returns (CuPy's here), as the oracle says; so does a combine of the rows received, called with
    the token count."""
    R, me = comm.nranks, comm.rank
    inputs = [make_inputs(seed, r, n, h, k, e, nranks=R) for r in range(R)]
    want = reference.dispatch(
        [bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], [w for _, _, w in inputs], e
    )
    exp_x, exp_idx, exp_w, _, exp_src = want[me]
    asked, made = [], []

    def allocate(rows):
        asked.append(rows)
        made.append(
            types.SimpleNamespace(
                recv_x=cupy.empty((rows, h), cupy.uint16),
                recv_scales=None,
                recv_topk_idx=cupy.empty((rows, k), cupy.int64),
                recv_topk_weights=cupy.empty((rows, k), cupy.float32),
                recv_src_idx=cupy.empty((rows,), cupy.int32),
            )
        )
        return made[-1]

    with cupy.cuda.Device(comm.device):
        x, topk, w = (dev(a) for a in inputs[me])
        result = comm.dispatch(x, topk_idx=topk, topk_weights=w, num_experts=e, out=allocate)
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        if asked != [exp_src.shape[0]]:
            return f"the allocator was asked for {asked}; {exp_src.shape[0]} rows arrive"
        if result.recv_x.ptr != made[0].recv_x.data.ptr:
            return "recv_x is not the allocator's array"
        got = (bf16_values(made[0].recv_x.get()), made[0].recv_topk_idx.get(), made[0].recv_topk_weights.get())
        if not all(exact_equal(a, b) for a, b in zip(got, (exp_x, exp_idx, exp_w), strict=True)):
            return "the allocator's arrays differ from the oracle"
        if not np.array_equal(made[0].recv_src_idx.get(), exp_src[:, 1]):
            return "recv_src_idx differs"

        want_out = reference.combine(
            [w[0] for w in want], [w[4] for w in want], [n] * R, topk_weights=[w[2] for w in want]
        )[me]
        combine_asked, combined = [], []

        def allocate_combined(rows):
            combine_asked.append(rows)
            combined.append((cupy.empty((rows, h), cupy.uint16), cupy.empty((rows, k), cupy.float32)))
            return combined[-1]

        out = comm.combine(result.recv_x, result.handle, topk_weights=result.recv_topk_weights, out=allocate_combined)
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        if combine_asked != [n]:
            return f"the combine's allocator was asked for {combine_asked}; the handle routes {n} tokens"
        if out.out.ptr != combined[0][0].data.ptr:
            return "the combine's out is not the allocator's array"
        if not exact_equal(bf16_values(combined[0][0].get()), want_out[0]):
            return "the combine into the allocator's array differs from the oracle"
        if not exact_equal(combined[0][1].get(), want_out[1]):
            return "the combined weights in the allocator's array differ from the oracle"
    return True


def slow_then_fill(target, host_values, stream):
    """Enqueues tens of milliseconds of matrix work, then the real values, on `stream`: a call that does not wait
    for `stream` reads the zeros that are there before."""
    with stream:
        work = cupy.ones((4096, 4096), cupy.float32)
        for _ in range(8):
            work = (work @ work) * cupy.float32(1e-4)
        target[...] = cupy.asarray(host_values)


def async_case(comm, seed, use_event):
    """async_finish (runs on the communicator stream after the caller's work) or previous_event (waits for an event
    of another stream): either way the dispatch must see inputs that become ready late."""
    R, me, n, h, k, e = comm.nranks, comm.rank, 256, 512, 4, 16
    inputs = [make_inputs(seed, r, n, h, k, e) for r in range(R)]
    want = reference.dispatch([bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], None, e)[me]
    with cupy.cuda.Device(comm.device):
        producer = cupy.cuda.Stream(non_blocking=True)
        x_dev = cupy.zeros((n, h), cupy.uint16)
        topk_dev = cupy.asarray(inputs[me][1])
        cupy.cuda.runtime.deviceSynchronize()
        slow_then_fill(x_dev, inputs[me][0], producer)
        if use_event:
            ready = cupy.cuda.Event()
            ready.record(producer)
            consumer = cupy.cuda.Stream(non_blocking=True)
            result = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e, stream=consumer, previous_event=ready)
        else:
            result = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e, stream=producer, async_finish=True)
            if result.event is None or result.recv_x.stream != comm.stream:
                return "async dispatch did not run on the communicator stream with an event"
            result.event.synchronize()
            if not result.event.query():
                return "the event is not complete after synchronize()"
        got = bf16_values(result.recv_x.to_numpy())
    comm.check_async_error()
    return exact_equal(got, want[0]) or "the dispatch read inputs before they were ready"


def bits_once_event_done(array):
    """A pydeepep array's bits copied on a stream of their own, without waiting for the stream that produced them
    (to_numpy would): what a caller that only waited for the call's event reads."""
    host = np.empty(array.shape, array.dtype)
    side = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.runtime.memcpyAsync(host.ctypes.data, array.ptr, host.nbytes, 2, side.ptr)  # device to host
    side.synchronize()
    return host


def combine_async_case(comm, seed, use_event, n=256, h=512, k=4, e=16):
    """async_finish on a combine (it runs on the communicator stream, after the caller's work) returns an event; with
    `use_event` the combine also waits for previous_event, recorded on another stream than the call's. Either way the
    combine must read expert outputs and weights that become ready late, and once the returned event is done its
    outputs (read without waiting for any stream) must match the oracle bit for bit."""
    R, me = comm.nranks, comm.rank
    inputs = [make_inputs(seed, r, n, h, k, e, nranks=R) for r in range(R)]
    want = reference.dispatch([bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], None, e)
    ms = [w[4].shape[0] for w in want]
    ys = [
        bf16_bits(np.random.default_rng([seed, 99, r]).standard_normal((ms[r], h)).astype(np.float32)) for r in range(R)
    ]
    yw = [np.random.default_rng([seed, 98, r]).random((ms[r], k)).astype(np.float32) for r in range(R)]
    combined = reference.combine([bf16_values(y) for y in ys], [w[4] for w in want], [n] * R, topk_weights=yw)
    want_out, want_w = combined[me]
    with cupy.cuda.Device(comm.device):
        routed = comm.dispatch(dev(inputs[me][0]), topk_idx=dev(inputs[me][1]), num_experts=e)
        if routed.recv_x.shape[0] != ms[me]:
            return f"the dispatch received {routed.recv_x.shape[0]} rows, the oracle {ms[me]}"
        producer = cupy.cuda.Stream(non_blocking=True)
        y_dev = cupy.zeros((ms[me], h), cupy.uint16)
        yw_dev = cupy.zeros((ms[me], k), cupy.float32)
        cupy.cuda.runtime.deviceSynchronize()
        slow_then_fill(y_dev, ys[me], producer)
        with producer:
            yw_dev[...] = cupy.asarray(yw[me])  # after the slow work too
        if use_event:
            ready = cupy.cuda.Event()
            ready.record(producer)
            consumer = cupy.cuda.Stream(non_blocking=True)
            result = comm.combine(
                y_dev, routed.handle, topk_weights=yw_dev, stream=consumer, previous_event=ready, async_finish=True
            )
        else:
            result = comm.combine(y_dev, routed.handle, topk_weights=yw_dev, stream=producer, async_finish=True)
        if result.event is None or result.out.stream != comm.stream:
            return "the async combine did not run on the communicator stream with an event"
        result.event.synchronize()
        if not result.event.query():
            return "the event is not complete after synchronize()"
        got, got_w = bits_once_event_done(result.out), bits_once_event_done(result.topk_weights)
    comm.check_async_error()
    if not exact_equal(bf16_values(got), want_out):
        return "the combine output differs (inputs read before they were ready, or read before the event?)"
    return exact_equal(got_w, want_w) or "the combined weights differ"


# The oracle scenarios: name -> run_case arguments.
CASES = {
    "random_bf16": dict(seed=1, n=512, h=2560, k=8, e=64),
    "bf16_h7168": dict(seed=2, n=4096, h=7168, k=8, e=256),
    "bf16_h128": dict(seed=3, n=300, h=128, k=4, e=8),
    "bf16_h_not_128_multiple": dict(seed=4, n=200, h=1032, k=6, e=32),
    # Rows over 10 KB that are not whole rounds of 4 x 32 vectors (769): the copy-out's last, partial round.
    "bf16_large_rows_with_tail": dict(seed=27, n=300, h=6152, k=8, e=32),
    "empty_rank": dict(seed=5, n=lambda r: 0 if r == 1 else 100, h=256, k=4, e=16),
    # The empty rank passes no scales (a zero-size array) and must still receive FP8 rows with theirs.
    "fp8_empty_rank": dict(seed=21, n=lambda r: 0 if r == 0 else 237, h=512, k=4, e=32, fp8=True),
    "one_token": dict(seed=6, n=1, h=256, k=4, e=16),
    "all_to_one_rank": dict(seed=7, n=150, h=256, k=4, e=8 * RANKS, to_rank=1),
    "k1": dict(seed=8, n=333, h=512, k=1, e=16),
    "k32": dict(seed=9, n=64, h=512, k=32, e=64),
    "expert_alignment": dict(seed=10, n=257, h=256, k=8, e=32, alignment=128),
    "biases": dict(seed=11, n=200, h=512, k=4, e=16, biases=2),
    "one_bias": dict(seed=12, n=200, h=512, k=4, e=16, biases=1),
    # The combine's order (ranks ascending, then bias 0, then bias 1) with data whose sums depend on it: on two ranks
    # the two rows add alike either way, so there the biases' place and order is what it tells apart.
    "biases_order_sensitive": dict(seed=39, n=200, h=512, k=4, e=16, cancelling_biases=True),
    "strided_rows": dict(seed=13, n=128, h=512, k=4, e=16, strided=True),
    "fp8_float_scales": dict(seed=14, n=512, h=2560, k=8, e=64, fp8=True),
    "fp8_ue8m0_scales": dict(seed=15, n=512, h=7168, k=8, e=64, fp8=True, ue8m0=True),
    "fp8_h7168": dict(seed=16, n=4096, h=7168, k=8, e=256, fp8=True),
    "worst_case": dict(seed=17, n=300, h=256, k=4, e=16, worst=350 * RANKS),
    "no_weights": dict(seed=18, n=100, h=256, k=4, e=16, weights=False),
    "eight_sms": dict(seed=19, n=1000, h=512, k=8, e=32, num_sms=8),
    # 375 tokens per block over 12 pushing warps (rows over 10 KB): long runs, three tokens per warp between
    # progress releases.
    "long_runs_per_warp": dict(seed=24, n=3000, h=7168, k=8, e=32, num_sms=8),
    # Grids of at most 16 blocks (a lone publisher; 14 pushing warps for large rows with long runs, 9 in the
    # combine) with FP8 rows and packed scales, and in worst-case mode.
    "fp8_sixteen_sms": dict(seed=25, n=2048, h=7168, k=8, e=64, fp8=True, ue8m0=True, num_sms=16),
    "worst_case_eight_sms": dict(seed=26, n=300, h=7168, k=4, e=16, worst=350 * RANKS, num_sms=8),
    # Large rows with long runs on 16 blocks: 14 pushing warps and a lone publisher, 11 in a zero-copy dispatch.
    "bf16_sixteen_sms": dict(seed=28, n=4096, h=7168, k=8, e=256, num_sms=16),
    "reruns_identical": dict(seed=20, n=1024, h=1024, k=8, e=32, reruns=20),
    "reruns_identical_fp8": dict(seed=38, n=1024, h=1024, k=8, e=32, fp8=True, reruns=20),
    # FP8 rows 16 bytes apart from the row length, float32 scale rows 3 words apart from theirs (H/128 = 8), and top-k
    # ids and weights in column slices of wider arrays; then UE8M0-packed scale rows (2 words) 3 words apart, and FP8
    # rows 8 bytes apart from theirs (rows off 16-byte alignment: the copies' narrower path).
    "strided_fp8_padded_scales_strided_topk": dict(
        seed=34, n=300, h=1024, k=6, e=32, fp8=True, strided=True, strided_topk=True
    ),
    "strided_fp8_ue8m0_padded_scales": dict(
        seed=35, n=lambda r: 0 if r == 1 else 250, h=640, k=4, e=16, fp8=True, ue8m0=True, strided=8, strided_topk=True
    ),
    # Exact-size results from a dispatch that exchanges the counts in its kernel (a bound on the rows).
    "bounded_bf16": dict(seed=22, n=700, h=512, k=8, e=32, bound=RANKS * 700, reruns=2),
    "bounded_fp8_aligned_empty_rank": dict(
        seed=23, n=lambda r: 0 if r == 1 else 300, h=256, k=4, e=16, fp8=True, alignment=8, bound=RANKS * 300
    ),
}


def run_scenarios(info, tier, scenarios, out):
    """Runs `scenarios` (name -> a call giving True or what went wrong) into `out`, logging each, and stops after a
    timeout (the ranks are then out of step: later scenarios would only time out too)."""
    for name, scenario in scenarios.items():
        try:
            out[name] = scenario()
        except Exception:
            out[name] = traceback.format_exc()
        log_scenario(tier, info, name, out[name])
        if isinstance(out[name], str) and "Timeout" in out[name]:
            break


def run_cases(comm, info, tier, cases, out):
    """run_scenarios of `cases` (name -> run_case arguments)."""
    run_scenarios(info, tier, {name: functools.partial(run_case, comm, **case) for name, case in cases.items()}, out)


def scenario_communicator(info, timeout=20, **kwargs):
    """The communicator the scenarios run on: room for MAX_TOKENS tokens of up to H = 7168 and K = 32."""
    return pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=timeout,
        max_tokens_per_rank=MAX_TOKENS,
        hidden=7168,
        num_topk=32,
        **kwargs,
    )


def ht_scenarios(info):
    out = {}
    with scenario_communicator(info) as comm:
        run_cases(comm, info, "ht", CASES, out)
        if any(isinstance(v, str) and "Timeout" in v for v in out.values()):
            return out
        run_scenarios(
            info,
            "ht",
            {
                "async_finish": lambda: async_case(comm, 31, False),
                "previous_event": lambda: async_case(comm, 31, True),
                "combine_async_finish": lambda: combine_async_case(comm, 36, False),
                "combine_previous_event": lambda: combine_async_case(comm, 36, True),
                "graph_replay": lambda: graph_case(comm, 30),
                "captured_handles": lambda: captured_handles_case(comm, 32),
                "allocator_out": lambda: allocator_case(comm, 33),
            },
            out,
        )
        # Dispatches that must be refused, each with the error it must give:
        # - too many rows for a worst-case output: an error with the count, never truncation;
        # - ranks that disagree on a collective parameter (here E): an error, never corrupted counts;
        # - ranks whose rows are laid out differently (here top-k 2 and 3, whose rows have the same size once the ids
        #   and weights are padded to 16 bytes): an error, never ids read as weights.
        refusals = [
            (
                "worst_overflow",
                pydeepep.DeepEPBufferTooSmall,
                (40, 200, 4, 0.0),
                dict(num_experts=16, num_worst_tokens=10),
            ),
            (
                "bounded_overflow",
                pydeepep.DeepEPBufferTooSmall,
                (47, 200, 4, 0.0),
                dict(num_experts=16, max_recv_tokens=10),
            ),
            (
                "disagreeing_experts",
                pydeepep.DeepEPInvalidArgument,
                (41, 64, 4, 0.2),
                dict(num_experts=16 if info.rank == 0 else 32),
            ),
            (
                "disagreeing_layout",
                pydeepep.DeepEPInvalidArgument,
                (42, 64, 2 if info.rank == 0 else 3, 0.2),
                dict(num_experts=16, num_worst_tokens=128),
            ),
            (
                "disagreeing_layout_exact",
                pydeepep.DeepEPInvalidArgument,
                (46, 64, 2 if info.rank == 0 else 3, 0.2),
                dict(num_experts=16),
            ),
        ]
        for name, error, (seed, n, k, drop), kwargs in refusals:
            x, topk, _ = make_inputs(seed, info.rank, n, 256, k, 16, drop=drop)
            out[name] = refusal(comm, error, dispatch_host_inputs, comm, x, topk, **kwargs)
            log_scenario("ht", info, name, out[name])
        # Ranks whose cached dispatches use handles of different routings (each rank's handle expects other totals
        # from its peer than the peer sends): an error, never rows written into another source's outputs.
        x, topk, _ = make_inputs(44, info.rank, 64, 256, 4, 16, drop=0.0)
        x2, topk2, _ = make_inputs(45, info.rank, 64, 256, 4, 16, drop=0.6)
        first = cached_dispatch_with_mismatched_handles(comm, info, out, "mismatched_handles", (x, topk), (x2, topk2))
        # The right handles still serve their combine afterwards: a receiver keeps no range of another routing.
        inputs = [make_inputs(44, r, 64, 256, 4, 16, drop=0.0) for r in range(info.nranks)]
        want = reference.dispatch([bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], None, 16)
        want_out = reference.combine([w[0] for w in want], [w[4] for w in want], [64] * info.nranks)[info.rank]
        try:
            got = bf16_values(comm.combine(first.recv_x, first.handle).out.to_numpy())
            comm.check_async_error()
            out["right_handles_after_mismatched_ones"] = exact_equal(got, want_out) or "the combine differs"
        except pydeepep.DeepEPError as exc:
            out["right_handles_after_mismatched_ones"] = f"{type(exc).__name__}: {exc}"
            comm.clear_async_error()
        # The same with handles of two dispatches of the same inputs, whose totals agree: the handles name the
        # operation that routed them, so the ranks still tell them apart.
        x, topk, _ = make_inputs(50, info.rank, 64, 256, 4, 16)
        cached_dispatch_with_mismatched_handles(comm, info, out, "other_dispatchs_handle_cached", (x, topk), (x, topk))
        # Ranks that combine with the handles of different dispatches (one hidden and top-k, other routings): an error
        # naming it, at once, never other tokens' rows summed or a wait until the timeout for rows that never come.
        x, topk, _ = make_inputs(51, info.rank, 64, 256, 4, 16)
        x2, topk2, _ = make_inputs(52, info.rank, 64, 256, 4, 16)
        first = dispatch_host_inputs(comm, x, topk, num_experts=16)
        second = dispatch_host_inputs(comm, x2, topk2, num_experts=16)
        answered = first if info.rank == 0 else second
        timed_combine_refusal(
            comm, info, out, "other_dispatchs_handle_combine", pydeepep.DeepEPInvalidArgument, answered
        )
        # A rank whose handle's worst-case dispatch failed (here the ranks disagreed on E, which both saw) combines
        # while its peer combines with a good handle, as after a timeout only one rank saw: the failed handle moves no
        # rows and says so, so the peer's combine ends at once with DeepEPRemoteError instead of at the timeout.
        x, topk, _ = make_inputs(53, info.rank, 64, 256, 4, 16)
        failed = dispatch_host_inputs(comm, x, topk, num_experts=16 if info.rank == 0 else 32, num_worst_tokens=128)
        out["failed_handle_dispatch"] = refusal(comm, pydeepep.DeepEPInvalidArgument, lambda: None)
        good = dispatch_host_inputs(comm, x, topk, num_experts=16)
        answered = good if info.rank == 0 else failed
        timed_combine_refusal(comm, info, out, "failed_handle_combine", pydeepep.DeepEPError, answered)
        # The same for a cached dispatch on the failed handle (the error was cleared since): it moves no rows, says
        # why again, and the peer's dispatch ends at once.
        started = time.monotonic()
        out["failed_handle_cached"] = refusal(comm, pydeepep.DeepEPError, comm.dispatch, dev(x), handle=answered.handle)
        out["failed_handle_cached_seconds"] = time.monotonic() - started
        log_scenario("ht", info, "failed_handle_cached", out["failed_handle_cached"])
        # Ranks that combine rows of different widths (hidden 256 and 128): an error, never rows summed at the wrong
        # stride.
        x, topk, _ = make_inputs(43, info.rank, 64, 256, 4, 16)

        def combine_other_widths():
            d = dispatch_host_inputs(comm, x, topk, num_experts=16)
            comm.combine(cupy.zeros((d.recv_x.shape[0], 256 if info.rank == 0 else 128), cupy.uint16), d.handle)

        out["disagreeing_combine_layout"] = refusal(comm, pydeepep.DeepEPInvalidArgument, combine_other_widths)
        log_scenario("ht", info, "disagreeing_combine_layout", out["disagreeing_combine_layout"])
        run_scenarios(info, "ht", {"one_rank_refuses": lambda: one_rank_refuses_case(comm, 48)}, out)
    return out


def refused_dispatch_rank(info):
    """refused_dispatch_then_combine_case on a communicator of its own (a job of its own, to run on 4 ranks alone)."""
    out = {}
    with scenario_communicator(info, timeout=10) as comm:
        run_scenarios(info, "refused", {"refused_dispatch_then_combine": lambda: refused_case(comm, 49)}, out)
    return out


# On a communicator with a zero-copy dispatch area (the peers write the rows straight into it, recv_x views it).
ZERO_COPY_CASES = [
    "random_bf16",
    "bf16_h7168",
    "bf16_h_not_128_multiple",
    "empty_rank",
    "fp8_empty_rank",
    "one_token",
    "all_to_one_rank",
    "k32",
    "expert_alignment",
    "fp8_ue8m0_scales",
    "fp8_h7168",
    "worst_case",
    "eight_sms",
    "long_runs_per_warp",
    "fp8_sixteen_sms",
    "worst_case_eight_sms",
    "bf16_sixteen_sms",
    "reruns_identical",
    "reruns_identical_fp8",
    "bounded_bf16",
    "bounded_fp8_aligned_empty_rank",
]


def outputs_outlive_a_peers_next_dispatch(comm, seed, n=512, h=512, k=4, e=16):
    """A zero-copy dispatch's outputs stay as they are until this rank's next dispatch, even when a peer issued its
    next one long before: rank 0 reads them 2 s after rank 1 launched a cached dispatch with new data."""
    R, me = comm.nranks, comm.rank
    inputs = [make_inputs(seed, r, n, h, k, e) for r in range(R)]
    new_x = [make_inputs(seed + 1, r, n, h, k, e)[0] for r in range(R)]
    topks = [t for _, t, _ in inputs]
    want_first = reference.dispatch([bf16_values(x) for x, _, _ in inputs], topks, None, e)[me][0]
    want_second = reference.dispatch([bf16_values(x) for x in new_x], topks, None, e)[me][0]
    with cupy.cuda.Device(comm.device):
        topk_dev = dev(topks[me])
        first = comm.dispatch(dev(inputs[me][0]), topk_idx=topk_dev, num_experts=e)
        cupy.cuda.runtime.deviceSynchronize()
        if me == 0:
            time.sleep(2.0)  # the peers' next dispatches are on their devices meanwhile
        got_first = bf16_values(first.recv_x.to_numpy())
        second = comm.dispatch(dev(new_x[me]), topk_idx=topk_dev, handle=first.handle)
        got_second = bf16_values(second.recv_x.to_numpy())
    comm.check_async_error()
    if not exact_equal(got_first, want_first):
        return "the first dispatch's rows changed before this rank's next dispatch"
    return exact_equal(got_second, want_second) or "the second dispatch's rows differ"


def zero_copy_scenarios(info):
    out = {}
    with scenario_communicator(info, zero_copy_dispatch=True) as comm:
        if not comm.zero_copy_dispatch:
            return {"setup": "the communicator has no zero-copy dispatch area"}
        run_cases(comm, info, "zero-copy", {name: CASES[name] for name in ZERO_COPY_CASES}, out)
        if any(isinstance(v, str) and "Timeout" in v for v in out.values()):
            return out
        extra = [
            ("async_finish", lambda: async_case(comm, 31, False)),
            ("graph_replay", lambda: graph_case(comm, 30)),
            ("outputs_outlive_a_peers_next_dispatch", lambda: outputs_outlive_a_peers_next_dispatch(comm, 49)),
            ("one_rank_refuses", lambda: one_rank_refuses_case(comm, 48)),
        ]
        # More rows than a worst-case output holds: the rows past it are not written, and the error gives the count.
        x, topk, _ = make_inputs(40, info.rank, 200, 256, 4, 16, drop=0.0)
        extra.append(
            (
                "worst_overflow",
                lambda: refusal(
                    comm,
                    pydeepep.DeepEPBufferTooSmall,
                    dispatch_host_inputs,
                    comm,
                    x,
                    topk,
                    num_experts=16,
                    num_worst_tokens=10,
                ),
            )
        )
        run_scenarios(info, "zero-copy", dict(extra), out)
    return out


def one_rank_refuses_case(comm, seed, n=64, h=256, k=4, e=16):
    """A call that only the last rank refuses on the host, in each flow, refused by pydeepep (an array of the wrong
    shape or type, a scalar argument or a handle of the wrong type) or by the library (an expert count that does not
    divide over the ranks, other tokens than the handle's): that rank raises its refusal, every other rank gets
    DeepEPRemoteError naming it at once (well within the communicator's 20 s timeout, which a rank waiting for the
    refuser would run into), and the ranks stay in step: a dispatch and combine afterwards match the oracle."""
    R, me = comm.nranks, comm.rank
    refuser = R - 1
    bad = me == refuser
    x, topk, w = make_inputs(seed, me, n, h, k, e, nranks=R)
    with cupy.cuda.Device(comm.device):
        xd, topkd, wd = dev(x), dev(topk), dev(w)
        routed = comm.dispatch(xd, topk_idx=topkd, num_experts=e)  # the handle of the cached dispatch and the combine
        rows = routed.recv_x.shape[0]
        cupy.cuda.runtime.deviceSynchronize()
        invalid = pydeepep.DeepEPInvalidArgument
        # what -> (the call, what the refusing rank raises)
        calls = {
            "exact-size dispatch": (
                lambda: comm.dispatch(xd, topk_idx=topkd, topk_weights=wd[:, :1] if bad else wd, num_experts=e),
                invalid,
            ),
            "worst-case dispatch": (
                lambda: comm.dispatch(xd, topk_idx=topkd, num_experts=e + 1 if bad else e, num_worst_tokens=R * n),
                invalid,
            ),
            "cached dispatch": (lambda: comm.dispatch(xd[: n - 1] if bad else xd, handle=routed.handle), invalid),
            "combine": (
                lambda: comm.combine(cupy.zeros((rows, h), cupy.float32 if bad else cupy.uint16), routed.handle),
                invalid,
            ),
            "worst-case dispatch, num_sms a string": (
                lambda: comm.dispatch(
                    xd, topk_idx=topkd, num_experts=e, num_worst_tokens=R * n, num_sms="0" if bad else 0
                ),
                TypeError,
            ),
            "worst-case dispatch, num_worst_tokens a string": (
                lambda: comm.dispatch(xd, topk_idx=topkd, num_experts=e, num_worst_tokens=str(R * n) if bad else R * n),
                TypeError,
            ),
            "cached dispatch, expert_alignment a string": (
                lambda: comm.dispatch(xd, handle=routed.handle, expert_alignment="1" if bad else 1),
                TypeError,
            ),
            "combine, no handle": (lambda: comm.combine(routed.recv_x, None if bad else routed.handle), TypeError),
            # A refused dispatch lets the peers finish either kind: the refusal may be of the very arguments that tell
            # the kinds apart (a C caller's NULL args, a binding's guess). Last: the peers' handle is not used again.
            "a cached dispatch refused while the peers make a worst-case one": (
                lambda: (
                    comm.dispatch(xd[: n - 1], handle=routed.handle)
                    if bad
                    else comm.dispatch(xd, topk_idx=topkd, num_experts=e, num_worst_tokens=R * n)
                ),
                invalid,
            ),
            "a worst-case dispatch refused while the peers make a cached one": (
                lambda: (
                    comm.dispatch(xd, topk_idx=topkd, num_experts=e + 1, num_worst_tokens=R * n)
                    if bad
                    else comm.dispatch(xd, handle=routed.handle)
                ),
                invalid,
            ),
        }
        failures = one_rank_refusal_failures(comm, calls, refuser, cupy.cuda.runtime.deviceSynchronize)
    verdict = run_case(comm, seed + 1, n=200, h=512, k=k, e=e)
    if verdict is not True:
        failures.append(f"after the refusals: {verdict}")
    return "; ".join(failures) if failures else True


def refused_case(comm, seed, n=64, h=256, k=4, e=16):
    """The last rank refuses a dispatch whose other ranks return (worst-case, cached, exact-size past the count
    exchange), or fails a bounded one whose rows overflow its bound alone: its exception carries ``refused_handle``, a
    combine given it raises DeepEPInvalidUsage, and every other rank's combine of that dispatch ends at once (not at
    the 10 s timeout) with DeepEPRemoteError naming the refuser, also on more than 2 ranks, where after a refused
    worst-case dispatch no rank has rows or receive ranges to push. The calls run on 4 blocks more than the default
    (24 on 2 ranks, 32 on more) where the device has the SMs, so that a refusal on the default block count would
    leave the others' blocks past it waiting. A count exchange refused on that rank leaves no refused_handle (every
    rank raises there, and none combines). Afterwards a dispatch and combine match the oracle."""
    import time

    sm_count = cupy.cuda.runtime.getDeviceProperties(comm.device)["multiProcessorCount"]  # under MPS: the client's
    num_sms = min((24 if comm.nranks <= 2 else 32) + 4, sm_count)
    R, me = comm.nranks, comm.rank
    refuser = R - 1
    bad = me == refuser
    x, topk, w = make_inputs(seed, me, n, h, k, e, nranks=R)
    failures = []
    with cupy.cuda.Device(comm.device):
        xd, topkd = dev(x), dev(topk)
        routed = comm.dispatch(xd, topk_idx=topkd, num_experts=e, num_sms=num_sms)
        small = comm.dispatch(xd[:4], topk_idx=topkd[:4], num_experts=e)  # out= arrays of another row count
        cupy.cuda.runtime.deviceSynchronize()
        dispatches = {
            "worst-case": lambda: comm.dispatch(
                xd, topk_idx=topkd, num_experts=e + 1 if bad else e, num_worst_tokens=R * n, num_sms=num_sms
            ),
            "cached": lambda: comm.dispatch(xd[: n - 1] if bad else xd, handle=routed.handle),
            "exact-size, outputs refused after the count exchange": lambda: comm.dispatch(
                xd, topk_idx=topkd, num_experts=e, num_sms=num_sms, out=small if bad else None
            ),
            # Not refused: the rows overflow the refusing rank's bound alone, so the others' bounded dispatch returns.
            "bounded, too many rows for the refusing rank's bound": lambda: comm.dispatch(
                xd, topk_idx=topkd, num_experts=e, num_sms=num_sms, max_recv_tokens=10 if bad else R * n
            ),
        }
        for what, dispatch in dispatches.items():
            start = time.monotonic()
            refused = result = said = None
            try:
                result = dispatch()
            except Exception as exc:
                refused = getattr(exc, "refused_handle", None)
                said = exc
            if bad and refused is None:
                failures.append(f"{what}: the refusing rank's dispatch gave {said!r}, no refused_handle")
                refused = pydeepep.RefusedHandle(comm, None, num_sms)  # the combine must still be made
            if not bad and result is None:
                failures.append(f"{what}: the dispatch raised {said!r}")
            try:
                if bad:
                    comm.combine(cupy.zeros((1, h), cupy.uint16), refused)
                else:
                    comm.combine(result.recv_x, result.handle)
                cupy.cuda.runtime.deviceSynchronize()
                comm.check_async_error()
                said = None
            except Exception as exc:
                said = exc
            finally:
                comm.clear_async_error()
            took = time.monotonic() - start
            if bad and not (isinstance(said, pydeepep.DeepEPInvalidUsage) and "refused_handle" in str(said)):
                failures.append(f"{what}: the refusing rank's combine gave {said!r}")
            if not bad and not (
                isinstance(said, pydeepep.DeepEPRemoteError) and f"rank {refuser} refused the call" in str(said)
            ):
                failures.append(f"{what}: the combine gave {said!r}")
            if took > 5:
                failures.append(f"{what}: took {took:.1f} s")
        try:  # a count exchange refused on the last rank: every rank raises, none gets a refused_handle
            comm.dispatch(xd, topk_idx=topkd, num_experts=e + 1 if bad else e)
            failures.append("the refused count exchange returned")
        except Exception as exc:
            if getattr(exc, "refused_handle", None) is not None:
                failures.append(f"the refused count exchange left a refused_handle: {exc!r}")
        comm.clear_async_error()
    try:
        verdict = run_case(comm, seed + 1, n=200, h=512, k=k, e=e)
    except Exception as exc:
        verdict = repr(exc)
    if verdict is not True:
        failures.append(f"after the refusals: {verdict}")
    return "; ".join(failures) if failures else True


def dispatch_host_inputs(comm, x, topk, **kwargs):
    return comm.dispatch(dev(x), topk_idx=dev(topk), **kwargs)


def refusal(comm, error, call, *args, **kwargs):
    """'<class name>: <message>' of the `error` that `call(*args, **kwargs)` raises on the communicator's device, or
    records there by the time it is done ("no error" when neither happens; "unexpected" and a traceback for any other
    exception, whose message may hold the same words). The error record is cleared for the next scenario."""
    try:
        with cupy.cuda.Device(comm.device):
            call(*args, **kwargs)
            cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        said = "no error"
    except error as exc:
        said = f"{type(exc).__name__}: {exc}"
    except Exception:
        said = "unexpected " + traceback.format_exc()
    comm.clear_async_error()
    return said


def refused_with(said, error, phrase):
    """Whether refusal() gave `error` itself with `phrase` in its message (its text for another exception holds the
    traceback, whose message may hold the same words)."""
    return said.startswith(f"{error.__name__}: ") and phrase in said


def cached_dispatch_with_mismatched_handles(comm, info, out, name, first_inputs, second_inputs):
    """out[name]: refusal() of a cached dispatch of the first inputs in which rank 0 passes the handle of a dispatch of
    `first_inputs` and the other ranks that of `second_inputs` ((x, topk_idx) each, E = 16). Returns the first
    dispatch's result."""
    first = dispatch_host_inputs(comm, *first_inputs, num_experts=16)
    second = dispatch_host_inputs(comm, *second_inputs, num_experts=16)
    stale = first if info.rank == 0 else second
    out[name] = refusal(comm, pydeepep.DeepEPInvalidArgument, comm.dispatch, dev(first_inputs[0]), handle=stale.handle)
    log_scenario("ht", info, name, out[name])
    return first


def timed_combine_refusal(comm, info, out, name, error, answered):
    """out[name]: refusal() of a combine of zero rows (H = 256) with `answered`'s handle; out[name + "_seconds"]: how
    long it took."""
    started = time.monotonic()
    rows = cupy.zeros((answered.recv_x.shape[0], 256), cupy.uint16)
    out[name] = refusal(comm, error, comm.combine, rows, answered.handle)
    out[name + "_seconds"] = time.monotonic() - started
    log_scenario("ht", info, name, out[name])


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(ht_scenarios, nprocs=RANKS, timeout=150 * RANKS)


@pytest.mark.parametrize(
    "scenario",
    [
        *CASES,
        "async_finish",
        "previous_event",
        "combine_async_finish",
        "combine_previous_event",
        "graph_replay",
        "allocator_out",
    ],
)
def test_ht_dispatch_and_combine_match_the_oracle(results, scenario):
    assert all_true([r.get(scenario, "not run") for r in results]), [r.get(scenario) for r in results]


def test_a_handle_a_graph_uses_serves_cached_calls_outside_it_but_is_never_routed_under_it(results):
    assert all_true([r.get("captured_handles", "not run") for r in results]), [
        r.get("captured_handles") for r in results
    ]


@pytest.fixture(scope="module")
def zero_copy_results():
    return spawn_ranks(zero_copy_scenarios, nprocs=RANKS, timeout=150 * RANKS)


@pytest.mark.parametrize(
    "scenario",
    [*ZERO_COPY_CASES, "async_finish", "graph_replay", "outputs_outlive_a_peers_next_dispatch", "one_rank_refuses"],
)
def test_zero_copy_dispatch_and_combine_match_the_oracle(zero_copy_results, scenario):
    assert all_true([r.get(scenario, "not run") for r in zero_copy_results]), [
        r.get(scenario) for r in zero_copy_results
    ]


def test_zero_copy_dispatch_of_more_rows_than_the_outputs_hold_is_an_error_with_the_count(zero_copy_results):
    for r in zero_copy_results:
        said = r.get("worst_overflow", "")
        assert refused_with(said, pydeepep.DeepEPBufferTooSmall, "rows arrive but the outputs hold 10"), said


def test_ranks_disagreeing_on_the_expert_count_get_an_error(results):
    for r in results:
        said = r.get("disagreeing_experts", "")  # a timeout of the count exchange names the notify too
        assert refused_with(
            said, pydeepep.DeepEPInvalidArgument, "found invalid argument in dispatch notify (count exchange)"
        ), said


@pytest.mark.parametrize("scenario", ["disagreeing_layout", "disagreeing_layout_exact", "mismatched_handles"])
def test_ranks_disagreeing_on_the_rows_they_exchange_get_an_error(results, scenario):
    for r in results:
        said = r.get(scenario, "")
        assert refused_with(said, pydeepep.DeepEPInvalidArgument, "invalid argument in dispatch:"), said


@pytest.mark.parametrize("scenario", ["other_dispatchs_handle_cached", "other_dispatchs_handle_combine"])
def test_ranks_passing_the_handles_of_different_dispatches_get_an_error_naming_it(results, scenario):
    for r in results:
        said = r.get(scenario, "")
        assert refused_with(said, pydeepep.DeepEPInvalidArgument, "passed the handle of another dispatch"), said


def test_the_right_handles_serve_their_combine_after_a_call_with_mismatched_ones(results):
    assert all_true([r.get("right_handles_after_mismatched_ones", "not run") for r in results]), [
        r.get("right_handles_after_mismatched_ones") for r in results
    ]


def test_a_combine_with_the_handles_of_different_dispatches_fails_well_before_the_timeout(results):
    for r in results:  # the communicator's timeout is 20 s
        assert r.get("other_dispatchs_handle_combine_seconds", float("inf")) < 10, r.get(
            "other_dispatchs_handle_combine_seconds"
        )


def test_a_combine_of_a_failed_worst_case_handle_ends_its_peers_combine_at_once(results):
    for r in results:
        said = r.get("failed_handle_dispatch", "")
        assert refused_with(said, pydeepep.DeepEPInvalidArgument, "invalid argument in dispatch:"), said
        assert r.get("failed_handle_combine_seconds", float("inf")) < 10, r.get("failed_handle_combine_seconds")
    good = results[0].get("failed_handle_combine", "")
    assert refused_with(good, pydeepep.DeepEPRemoteError, "refused the call"), good
    for r in results[1:]:
        failed = r.get("failed_handle_combine", "")
        assert refused_with(
            failed, pydeepep.DeepEPInvalidArgument, "the worst-case dispatch that routed its handle failed"
        ), failed


def test_a_cached_dispatch_on_a_failed_worst_case_handle_moves_nothing_and_ends_its_peers_at_once(results):
    for r in results:
        assert r.get("failed_handle_cached_seconds", float("inf")) < 10, r.get("failed_handle_cached_seconds")
    good = results[0].get("failed_handle_cached", "")
    assert refused_with(good, pydeepep.DeepEPRemoteError, "refused the call"), good
    assert "or a handle whose worst-case dispatch failed" in good, good
    for r in results[1:]:
        failed = r.get("failed_handle_cached", "")
        assert refused_with(
            failed, pydeepep.DeepEPInvalidArgument, "the worst-case dispatch that routed its handle failed"
        ), failed


def test_ranks_combining_rows_of_other_widths_get_an_error(results):
    for r in results:
        said = r.get("disagreeing_combine_layout", "")
        assert refused_with(said, pydeepep.DeepEPInvalidArgument, "invalid argument in combine:"), said


def test_a_call_one_rank_refuses_ends_at_once_everywhere_and_the_ranks_stay_in_step(results):
    assert all_true([r.get("one_rank_refuses", "not run") for r in results]), [
        r.get("one_rank_refuses") for r in results
    ]


def test_a_dispatch_refused_on_one_rank_leaves_a_handle_whose_combine_ends_the_peers_combine_at_once():
    results = spawn_ranks(refused_dispatch_rank, nprocs=RANKS, timeout=120 * RANKS)
    assert all_true([r.get("refused_dispatch_then_combine", "not run") for r in results]), [
        r.get("refused_dispatch_then_combine") for r in results
    ]


@pytest.mark.parametrize("scenario", ["worst_overflow", "bounded_overflow"])
def test_more_rows_than_the_outputs_hold_is_an_error_with_the_count(results, scenario):
    for r in results:
        said = r.get(scenario, "")
        assert refused_with(said, pydeepep.DeepEPBufferTooSmall, "rows arrive but the outputs hold 10"), said


def one_rank_ht(info):
    with pydeepep.Communicator(
        info.unique_id, 0, 1, device=0, timeout=60, max_tokens_per_rank=512, hidden=1024
    ) as comm:
        return run_case(comm, seed=50, n=300, h=1024, k=4, e=8, biases=1)


def skipping_peer(info, call):
    """Rank 1 never joins `call`: rank 0 must get a timeout naming it, within the timeout plus a few seconds, and both
    ranks must still close. Stream-ordered calls report it through the asynchronous error after a synchronisation."""

    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=4,
        max_tokens_per_rank=256,
        hidden=256,
        num_topk=4,
        num_experts=16,
        low_latency_max_tokens=64 if call.startswith("ll_") else 0,
    ) as comm:
        with cupy.cuda.Device(comm.device):
            x, topk, weights = make_inputs(60, info.rank, 64, 256, 4, 16)
            x_dev, topk_dev, w_dev = dev(x), dev(topk), dev(weights)
            # What both ranks do first: the call before the skipped one.
            if call == "combine":
                first = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=16)
            elif call == "ll_combine":
                first = comm.low_latency_dispatch(x_dev, topk_dev, 16, use_fp8=False)
            cupy.cuda.runtime.deviceSynchronize()
            comm.check_async_error()
            if info.rank == 1:
                time.sleep(6)  # past rank 0's 4 s timeout, well inside its teardown's
                return "skipped"
            start = time.monotonic()
            try:
                if call == "dispatch":
                    comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=16)
                elif call == "bounded_dispatch":  # the host waits for counts that never come
                    comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=16, max_recv_tokens=2 * 64)
                elif call == "combine":
                    comm.combine(first.recv_x, first.handle)
                elif call == "ll_dispatch":
                    comm.low_latency_dispatch(x_dev, topk_dev, 16)
                else:
                    y = cupy.zeros((8, 2 * 64, 256), cupy.uint16)
                    comm.low_latency_combine(y, topk_dev, w_dev, first)
                cupy.cuda.runtime.deviceSynchronize()
                comm.check_async_error()
                return "no error"
            except pydeepep.DeepEPTimeoutError as exc:
                return ("timeout", time.monotonic() - start, str(exc))


@pytest.mark.parametrize("call", ["dispatch", "bounded_dispatch", "combine", "ll_dispatch", "ll_combine"])
def test_a_peer_that_skips_a_call_gives_a_timeout_naming_it(call):
    rank0, rank1 = spawn_ranks(skipping_peer, nprocs=2, args=(call,), timeout=120)
    assert rank1 == "skipped"
    assert rank0[0] == "timeout" and rank0[1] < 4 + 5, rank0
    assert "waiting for rank 1" in rank0[2], rank0
