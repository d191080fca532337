"""`python -m pydeepep.bench`: measures libdeepep on the GPUs of this machine, one rank per local GPU.

For N in {512, 4096, 16384} tokens per rank (H = 7168, K = 8, E = 256) and SMs in {8, 16, 24, 32, 48}: the SM-push
NVLink ceiling, the dispatch layout, full dispatch (count exchange and host synchronisation), cached dispatch in BF16
and FP8, and combine. GB/s counts the bytes that cross NVLink (rows sent to other ranks). Times are medians: device
time per call replayed from a CUDA graph (no host gaps) for the graph-capturable calls; per call from Python, host
synchronisation included, for the full dispatch. N = 0 rows give the protocol's fixed cost. The low-latency section
first measures its floor (ll_flag_round: a kernel on the low-latency grid that moves nothing and exchanges one round
of per-block flags), then times, for T in {1, 32, 128, 256} tokens per rank (H = 7168, K = 8, E = 288), FP8 dispatch
and BF16 combine replayed from CUDA graphs (the combine as a dispatch + combine pair less the dispatch alone), the
same dispatch + combine pairs called from Python without a graph (ll_pair_eager, per pair, host time included), and
the send and receive phases of hooked calls (GB/s only for what sends). Writes a JSON record
(machine, commit, command, results, failed_sections) and, where matplotlib is installed, a PNG plot of GB/s against
SMs. A section that fails (ht, zc, ll) leaves the others' figures in the record, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import pydeepep
from pydeepep import reference
from pydeepep.launch import LaunchError, local_device_count

NUM_TOKENS = (512, 4096, 16384)
NUM_TOPK, NUM_EXPERTS = 8, 256


def _check(result):
    from cuda.bindings import driver

    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {result[0]!r}")
    return result[1] if len(result) > 1 else None


def time_calls(fn, stream: int, warmup: int, iters: int) -> float:
    """Median microseconds of `fn()` on `stream`, each call bracketed by its own pair of events."""
    from cuda.bindings import driver

    s = driver.CUstream(stream)
    for _ in range(warmup):
        fn()
    _check(driver.cuStreamSynchronize(s))
    pairs = [(_check(driver.cuEventCreate(0)), _check(driver.cuEventCreate(0))) for _ in range(iters)]
    for start, end in pairs:
        _check(driver.cuEventRecord(start, s))
        fn()
        _check(driver.cuEventRecord(end, s))
    _check(driver.cuStreamSynchronize(s))
    times = [_check(driver.cuEventElapsedTime(start, end)) * 1000.0 for start, end in pairs]
    for start, end in pairs:
        driver.cuEventDestroy(start)
        driver.cuEventDestroy(end)
    return float(np.median(times))


class CapturedGraph:
    """`fn()` called `repeat` times, captured from `stream` into an executable CUDA graph."""

    def __init__(self, fn, stream: int, repeat: int = 1):
        from cuda.bindings import driver

        self.stream = driver.CUstream(stream)
        self.repeat = repeat
        _check(driver.cuStreamBeginCapture(self.stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        try:
            for _ in range(repeat):
                fn()
        finally:
            graph = _check(driver.cuStreamEndCapture(self.stream))
        self.graph = graph
        self.exec = _check(driver.cuGraphInstantiate(graph, 0))

    def launch(self):
        from cuda.bindings import driver

        _check(driver.cuGraphLaunch(self.exec, self.stream))

    def close(self):
        from cuda.bindings import driver

        driver.cuGraphExecDestroy(self.exec)
        driver.cuGraphDestroy(self.graph)


def device_time(fn, stream: int, launches: int, repeat: int = 20) -> float:
    """Device microseconds per `fn()` call: `fn` captured `repeat` times into a CUDA graph (calls back to back, no host
    gaps), the graph launched 3 times to warm up, then the median over `launches` launches, divided by `repeat`."""
    graph = CapturedGraph(fn, stream, repeat)
    try:
        return time_calls(graph.launch, stream, warmup=3, iters=launches) / repeat
    finally:
        graph.close()


HIDDEN = 7168
SMS = (8, 16, 24, 32, 48)
MODES = ("ht", "zc", "ll")  # the sections, in the order they run


def _log(info, text):
    if info.rank == 0:
        print(text, flush=True)


def bench_layout(comm, info, stream, warmup, iters, tokens_list):
    rows = []
    rng = np.random.default_rng(info.rank)
    for n in tokens_list:
        topk = np.argsort(rng.random((n, NUM_EXPERTS)), axis=1)[:, :NUM_TOPK].astype(np.int64)
        topk_dev = pydeepep.to_device(topk, device=comm.device, stream=stream)
        outs = comm.get_dispatch_layout(topk_dev, NUM_EXPERTS, stream=stream)

        def call(topk_dev=topk_dev, outs=outs):
            return comm.get_dispatch_layout(topk_dev, NUM_EXPERTS, stream=stream, out=outs)

        host_us = time_calls(call, stream, warmup, iters)
        us = device_time(call, stream, iters)
        rows.append({"case": "layout", "num_tokens": n, "sms": 0, "us": us, "python_call_us": host_us})
        _log(info, f"  layout             N={n:<6}        {us:8.1f} us ({host_us:.1f} us per Python call)")
    return rows


class Inputs:
    """Device inputs of one benchmark size."""

    def __init__(self, x, q, scales, topk_idx, weights):
        self.x, self.q, self.scales, self.topk_idx, self.weights = x, q, scales, topk_idx, weights


def bench_case(comm, info, stream, warmup, iters, inp, n, sms, ceiling, sent_remote, own_rows):
    """On a zero-copy communicator (comm.zero_copy_dispatch) the dispatches only, as cases named ..._zc (its
    combine is the usual one). `sent_remote`: rows this rank dispatches to other ranks; `own_rows`: those it keeps."""
    # A source sends each token to a rank at most once: the ranks' tokens bound the rows any rank receives.
    bound = max(n * comm.nranks, 1)
    worst_handle = pydeepep.Handle(comm)

    def routed(**mode):
        """A dispatch with the routing in the arguments, in the given mode."""
        return comm.dispatch(
            inp.x,
            topk_idx=inp.topk_idx,
            topk_weights=inp.weights,
            num_experts=NUM_EXPERTS,
            num_sms=sms,
            stream=stream,
            **mode,
        )

    def full():  # count exchange and host synchronisation, then the dispatch
        return routed()

    def bounded():  # exact-size results, the counts exchanged inside the dispatch kernel
        return routed(max_recv_tokens=bound)

    def worst_bf16(out=None):
        # Routing preparation + dispatch with the count exchange in the kernel and no host synchronisation; next to
        # the cached figure it gives the routing's and the exchange's cost.
        return routed(num_worst_tokens=bound, handle=worst_handle, out=out)

    first = full()
    handle = first.handle
    full_us = time_calls(full, stream, warmup, iters)
    bounded_us = time_calls(bounded, stream, warmup, iters)
    fp8_first = comm.dispatch(
        inp.q, x_scales=inp.scales, topk_idx=inp.topk_idx, topk_weights=inp.weights, handle=handle, stream=stream
    )
    comb = comm.combine(first.recv_x, handle, stream=stream)

    def cached_bf16():
        comm.dispatch(inp.x, topk_idx=inp.topk_idx, topk_weights=inp.weights, handle=handle, stream=stream, out=first)

    def cached_fp8():
        comm.dispatch(
            inp.q,
            x_scales=inp.scales,
            topk_idx=inp.topk_idx,
            topk_weights=inp.weights,
            handle=handle,
            stream=stream,
            out=fp8_first,
        )

    def combine():
        comm.combine(first.recv_x, handle, stream=stream, out=comb)

    worst_out = worst_bf16()

    # Bytes that cross NVLink: a dispatch's rows this rank sends to the others; a combine's, the rows it received
    # from them (it sends those back).
    combined_remote = first.recv_x.shape[0] - own_rows
    results = {
        "dispatch_full_bf16": (full_us, HIDDEN * 2, sent_remote),
        "dispatch_bounded_bf16": (bounded_us, HIDDEN * 2, sent_remote),
        "dispatch_worst_bf16": (device_time(lambda: worst_bf16(worst_out), stream, iters), HIDDEN * 2, sent_remote),
        "dispatch_cached_bf16": (device_time(cached_bf16, stream, iters), HIDDEN * 2, sent_remote),
        "dispatch_cached_fp8": (device_time(cached_fp8, stream, iters), HIDDEN + HIDDEN // 128 * 4, sent_remote),
    }
    if comm.zero_copy_dispatch:
        results = {f"{case}_zc": value for case, value in results.items()}
    else:
        results["combine_bf16"] = (device_time(combine, stream, iters), HIDDEN * 2, combined_remote)
    comm.check_async_error()
    rows = []
    for case, (us, row_bytes, remote_rows) in results.items():
        gbps = remote_rows * row_bytes / (us * 1e-6) / 1e9  # 0 for the N = 0 protocol floor
        rows.append(
            {
                "case": case,
                "num_tokens": n,
                "sms": sms,
                "us": us,
                "gbps": gbps,
                "ceiling_gbps": ceiling,
                "ratio": gbps / ceiling,
            }
        )
        _log(
            info, f"  {case:<20} N={n:<6} SMs={sms:<3} {us:8.1f} us {gbps:7.1f} GB/s ({gbps / ceiling:.0%} of ceiling)"
        )
    return rows


def _meet(comm, stream: int) -> None:
    """Returns once every rank has reached it, and the work queued on `stream` after it starts within microseconds
    of the other ranks': a dispatch of no tokens, whose host waits for every rank's counts."""
    empty_x = pydeepep.to_device(np.zeros((0, HIDDEN), dtype=np.uint16), device=comm.device, stream=stream)
    empty_topk = pydeepep.to_device(np.zeros((0, NUM_TOPK), dtype=np.int64), device=comm.device, stream=stream)
    comm.dispatch(empty_x, topk_idx=empty_topk, num_experts=NUM_EXPERTS, stream=stream)


def bench_ht(comm, info, stream, warmup, iters, sms_list, tokens_list):
    """Full dispatch (count exchange + host sync), cached dispatch BF16 / FP8 and combine per (N, SMs), with the
    bytes that cross NVLink (rows sent to other ranks) and the SM-push ceiling of the same SM count."""
    rows = []
    ceilings = {}
    for sms in sms_list:
        # Every rank pushes at once, as in a dispatch: a measurement by one rank alone would give it the links and its
        # memory to itself (the layout section before this is local, so the ranks drift apart).
        _meet(comm, stream)
        ceilings[sms] = comm.measure_push_bandwidth(sms, stream=stream)
    for sms, gbps in ceilings.items():
        # The zero-copy section's own ceiling, which its ratios use, is recorded under a name of its own.
        case = "ceiling_push_zc" if comm.zero_copy_dispatch else "ceiling_push"
        rows.append({"case": case, "num_tokens": 0, "sms": sms, "gbps": gbps})
        _log(info, f"  SM-push ceiling    SMs={sms:<3}            {gbps:8.1f} GB/s")
    rng = np.random.default_rng(100 + info.rank)
    for n in tokens_list:
        topk = np.argsort(rng.random((n, NUM_EXPERTS)), axis=1)[:, :NUM_TOPK].astype(np.int64)
        in_rank = reference.dispatch_layout(topk, NUM_EXPERTS, comm.nranks)[2]
        sent_remote = int(np.delete(in_rank, comm.rank, axis=1).sum())
        own_rows = int(in_rank[:, comm.rank].sum())
        bits = rng.integers(0, 1 << 15, size=(n, HIDDEN), dtype=np.uint16)
        x = pydeepep.to_device(bits, device=comm.device, stream=stream)
        q = pydeepep.to_device(
            rng.integers(0, 0x7E, size=(n, HIDDEN), dtype=np.uint8), device=comm.device, stream=stream
        )
        scales = pydeepep.to_device(
            rng.random((n, HIDDEN // 128)).astype(np.float32), device=comm.device, stream=stream
        )
        topk_dev = pydeepep.to_device(topk, device=comm.device, stream=stream)
        weights = pydeepep.to_device(rng.random((n, NUM_TOPK)).astype(np.float32), device=comm.device, stream=stream)
        inputs = Inputs(x, q, scales, topk_dev, weights)
        for sms in sms_list:
            rows += bench_case(comm, info, stream, warmup, iters, inputs, n, sms, ceilings[sms], sent_remote, own_rows)
    return rows


def bench_rank(info, warmup, iters, sms_list=SMS, tokens_list=NUM_TOKENS, zero_copy=False):
    """The high-throughput section; with `zero_copy`, its dispatches on a zero-copy communicator (no layout)."""
    from cuda.core import Device

    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        max_tokens_per_rank=max(max(tokens_list), 1),
        hidden=HIDDEN,
        num_topk=NUM_TOPK,
        num_experts=NUM_EXPERTS,
        zero_copy_dispatch=zero_copy,
    ) as comm:
        stream_owner = Device(comm.device).create_stream()  # keeps the stream alive while its handle is used
        stream = int(stream_owner.handle)
        rows = [] if zero_copy else bench_layout(comm, info, stream, warmup, iters, tokens_list)
        rows += bench_ht(comm, info, stream, warmup, iters, sms_list, tokens_list)
        comm.check_async_error()
    return rows


LL_TOKENS = (1, 32, 128, 256)
LL_TOPK, LL_EXPERTS = 8, 288


def phase_times(send, receive, stream: int, repeat: int = 10, launches: int = 5) -> tuple[float, float]:
    """Median device microseconds of the send and the receive phase of hooked calls: `send()` then `receive()`
    captured `repeat` times into a graph with a timing event before, between and after, launched once to warm up and
    then `launches` times, each launch's marks read (repeat * launches samples)."""
    from cuda.bindings import driver

    s = driver.CUstream(stream)
    marks = [_check(driver.cuEventCreate(0)) for _ in range(3 * repeat)]
    captured = iter(range(repeat))

    def mark(event):
        # Inside a capture, only an "external" record becomes a node of the graph that records the time.
        _check(driver.cuEventRecordWithFlags(event, s, driver.CUevent_record_flags.CU_EVENT_RECORD_EXTERNAL))

    def step():
        i = next(captured)
        mark(marks[3 * i])
        send()
        mark(marks[3 * i + 1])
        receive()
        mark(marks[3 * i + 2])

    graph = CapturedGraph(step, stream, repeat)
    sends, receives = [], []
    try:
        for launch in range(1 + launches):
            graph.launch()
            _check(driver.cuStreamSynchronize(s))
            if launch == 0:
                continue  # warm-up
            for i in range(repeat):
                sends.append(_check(driver.cuEventElapsedTime(marks[3 * i], marks[3 * i + 1])) * 1e3)
                receives.append(_check(driver.cuEventElapsedTime(marks[3 * i + 1], marks[3 * i + 2])) * 1e3)
    finally:
        graph.close()
        for event in marks:
            driver.cuEventDestroy(event)
    return float(np.median(sends)), float(np.median(receives))


def hook_phases(comm, stream, x, topk, weights, y, dispatch_out, combine_out, dispatch_bytes, combine_bytes) -> dict:
    """Send and receive phases of hooked low-latency dispatch and combine (see phase_times): case -> (µs, the bytes
    the phase sends to other ranks)."""
    hooked = {}

    def dispatch_send():
        hooked["dispatch"] = comm.low_latency_dispatch(
            x, topk, LL_EXPERTS, stream=stream, out=dispatch_out, return_recv_hook=True
        )

    def dispatch_receive():
        hooked["dispatch"].hook()

    def combine_send():
        hooked["combine"] = comm.low_latency_combine(
            y, topk, weights, hooked["dispatch"], stream=stream, out=combine_out, return_recv_hook=True
        ).hook

    def combine_receive():
        hooked["combine"]()

    found = {}
    ptr = int(stream.handle)
    send_us, receive_us = phase_times(dispatch_send, dispatch_receive, ptr)
    found["ll_dispatch_send"] = (send_us, dispatch_bytes)
    found["ll_dispatch_receive"] = (receive_us, 0)
    dispatch_send()  # a current dispatch for the combines (those captured above belong to the graph)
    dispatch_receive()
    send_us, receive_us = phase_times(combine_send, combine_receive, ptr)
    found["ll_combine_send"] = (send_us, combine_bytes)
    found["ll_combine_receive"] = (receive_us, 0)
    return found


TIMELINE_MARKS = ("start", "acks", "counted", "stored", "published", "flags seen", "written", "end")


def timeline_summary(comm) -> str:
    """The last low-latency kernel's timeline (DEEPEP_LL_TIMELINE=1): per mark, median / max over the blocks that
    reached it, in µs after the first block started ("start" shows how late the other blocks began)."""
    marks = comm.low_latency_timeline()
    start = marks[:, 0][marks[:, 0] > 0].min()
    parts = []
    for m, name in enumerate(TIMELINE_MARKS):
        reached = marks[:, m][marks[:, m] > 0]
        if reached.size:
            after = (reached - start) / 1e3
            parts.append(f"{name} {np.median(after):.1f}/{after.max():.1f}")
    return ", ".join(parts)


def ll_timelines(comm, info, stream, x, topk, weights, y, result, out, t):
    """The timeline of a dispatch and of a combine (logged by rank 0), each the last of several back-to-back steps
    so that the ranks run in step (a lone call after a host synchronisation mostly shows how late the peer was)."""
    from cuda.bindings import driver

    ptr = driver.CUstream(int(stream.handle))
    steps = 5
    for last in ("dispatch", "combine"):
        for step in range(steps):
            dispatched = comm.low_latency_dispatch(x, topk, LL_EXPERTS, stream=stream, out=result)
            if last == "dispatch" and step == steps - 1:
                break
            comm.low_latency_combine(y, topk, weights, dispatched, stream=stream, out=out)
        _check(driver.cuStreamSynchronize(ptr))
        label = f"  ll_{last:<8} T={t} timeline"
        if last == "dispatch":
            label += ", us after the first block's start (median/max over blocks)"
        _log(info, f"{label}: " + timeline_summary(comm))
    # The receive kernel of a hooked dispatch on its own (its send finished before it started).
    hooked = comm.low_latency_dispatch(x, topk, LL_EXPERTS, stream=stream, out=result, return_recv_hook=True)
    _check(driver.cuStreamSynchronize(ptr))
    hooked.hook()
    _check(driver.cuStreamSynchronize(ptr))
    _log(info, f"  ll_dispatch T={t} hooked receive timeline: " + timeline_summary(comm))


def bench_ll_rank(info, iters, tokens_list, transport="auto"):
    """Low-latency dispatch (FP8 cast in the kernel) and combine (BF16) for each T, H = 7168, K = 8, E = 288: whole
    calls replayed from CUDA graphs, then the send and receive phases of hooked calls. GB/s counts the rows that
    cross NVLink (token-expert pairs whose expert lives on another rank). `transport`: the communicator's
    low_latency_transport."""
    from cuda.core import Device

    rows = []
    max_tokens = max(tokens_list)
    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        max_tokens_per_rank=max_tokens,
        hidden=HIDDEN,
        num_topk=LL_TOPK,
        num_experts=LL_EXPERTS,
        low_latency_max_tokens=max_tokens,
        low_latency_transport=transport,
    ) as comm:
        # Arrays allocated on a stream are freed on it: passing the stream object (not its handle) lets every array
        # keep it alive, however late Python frees them.
        stream = Device(comm.device).create_stream()
        ptr = int(stream.handle)
        # The floor of every low-latency call, next to which its figures are read: a kernel on the same grid that
        # moves nothing and exchanges one round of per-block flags.
        try:
            floor_us = comm.measure_flag_round(stream=stream)
            rows.append({"case": "ll_flag_round", "num_tokens": 0, "sms": 0, "us": floor_us})
            _log(info, f"  ll_flag_round        (one round of per-block flags, nothing moved) {floor_us:8.1f} us")
        except pydeepep.DeepEPInvalidArgument as exc:  # ranks outside the NVLink domain: reported, not fatal
            _log(info, f"  (ll_flag_round not measured: {exc})")
        local = LL_EXPERTS // comm.nranks
        rng = np.random.default_rng(200 + info.rank)
        y = pydeepep.empty((local, comm.nranks * max_tokens, HIDDEN), "bfloat16", device=comm.device, stream=stream)
        for t in tokens_list:
            topk_np = np.argsort(rng.random((t, LL_EXPERTS)), axis=1)[:, :LL_TOPK].astype(np.int64)
            # The dispatch sends an FP8 row (with its scales) for each of this rank's (token, expert) pairs on another
            # rank; the combine sends a BF16 row back for each row this rank's experts received from another rank.
            dispatch_bytes = int(np.count_nonzero(topk_np // local != comm.rank)) * (HIDDEN + HIDDEN // 128 * 4)
            x = pydeepep.to_device(
                rng.integers(0, 1 << 14, size=(t, HIDDEN), dtype=np.uint16), device=comm.device, stream=stream
            )
            topk = pydeepep.to_device(topk_np, device=comm.device, stream=stream)
            weights = pydeepep.to_device(rng.random((t, LL_TOPK)).astype(np.float32), device=comm.device, stream=stream)
            results = [comm.low_latency_dispatch(x, topk, LL_EXPERTS, stream=stream) for _ in range(2)]
            outs = [comm.low_latency_combine(y, topk, weights, r, stream=stream).out for r in results]
            received = results[0].recv_layout_range.to_numpy()[:, :, 1]  # [local expert, source rank]: rows
            combine_bytes = (int(received.sum()) - int(received[:, comm.rank].sum())) * HIDDEN * 2

            def dispatches(x=x, topk=topk, results=results):
                for r in results:
                    comm.low_latency_dispatch(x, topk, LL_EXPERTS, stream=stream, out=r)

            def pairs(x=x, topk=topk, weights=weights, results=results, outs=outs):
                for r, o in zip(results, outs, strict=True):
                    d = comm.low_latency_dispatch(x, topk, LL_EXPERTS, stream=stream, out=r)
                    comm.low_latency_combine(y, topk, weights, d, stream=stream, out=o)

            dispatch_us = device_time(dispatches, ptr, iters, repeat=5) / 2
            combine_us = device_time(pairs, ptr, iters, repeat=5) / 2 - dispatch_us
            # The same pairs called from Python one after another, no graph: what an eager decoding step pays, the
            # binding's host time included.
            eager_us = time_calls(pairs, ptr, 5, iters) / 2
            found = {
                "ll_dispatch_fp8": (dispatch_us, dispatch_bytes),
                "ll_combine_bf16": (combine_us, combine_bytes),
                "ll_pair_eager": (eager_us, 0),
            }
            if os.environ.get("DEEPEP_LL_TIMELINE") == "1":
                ll_timelines(comm, info, stream, x, topk, weights, y, results[0], outs[0], t)
            try:
                found.update(
                    hook_phases(comm, stream, x, topk, weights, y, results[0], outs[0], dispatch_bytes, combine_bytes)
                )
            except Exception as exc:  # a figure not measured is reported, not fatal
                _log(info, f"  (hook phases not measured at T={t}: {exc})")
            for case, (us, nbytes) in found.items():
                row = {"case": case, "num_tokens": t, "sms": 0, "us": us}
                if nbytes:  # a phase that sends nothing has no GB/s (not 0)
                    row["gbps"] = nbytes / (us * 1e-6) / 1e9
                rows.append(row)
                gbps = f"{row['gbps']:7.1f} GB/s" if nbytes else ""
                _log(info, f"  {case:<20} T={t:<5} {us:8.1f} us {gbps}")
        comm.check_async_error()
    return rows


def slowest_rows(per_rank: list[list[dict]]) -> list[dict]:
    """The summary's rows: for each timed case of rank 0 (the ceilings left out), the row of the rank that took
    longest, matched by (case, N, SMs), so that its µs, GB/s and ratio belong together. A case some rank did not
    report (a section that failed there) is left out."""
    keyed = [{(r["case"], r["num_tokens"], r["sms"]): r for r in rows if "us" in r} for rows in per_rank]
    found = []
    for key in keyed[0]:
        if all(key in rank_rows for rank_rows in keyed):
            found.append(max((rank_rows[key] for rank_rows in keyed), key=lambda r: r["us"]))
    return found


# The goals of the project's targets for 2 ranks on 2 x H200 (workload A: H = 7168, K = 8, E = 256; workload B: H =
# 7168, K = 8, E = 288), each as (what, case, N or T, SMs, DeepEP V1's µs on the same GPUs or None, goal µs). A goal
# that several of this library's calls can meet has a line for each. "At least DeepEP's 48-SM figures with 16 SMs"
# is the 16-SM lines' goal.
GOALS = (
    ("HT dispatch BF16, caller outputs", "dispatch_cached_bf16", 4096, 24, 345.0, 200.0),
    ("HT dispatch BF16, zero-copy", "dispatch_cached_bf16_zc", 4096, 24, 345.0, 200.0),
    ("HT dispatch FP8", "dispatch_cached_fp8", 4096, 24, 244.0, 120.0),
    ("HT dispatch FP8, zero-copy", "dispatch_cached_fp8_zc", 4096, 24, 244.0, 120.0),
    ("HT combine BF16", "combine_bf16", 4096, 24, 397.0, 220.0),
    ("HT dispatch BF16, caller outputs", "dispatch_cached_bf16", 4096, 16, 499.0, 226.0),
    ("HT dispatch BF16, zero-copy", "dispatch_cached_bf16_zc", 4096, 16, 499.0, 226.0),
    ("HT dispatch FP8", "dispatch_cached_fp8", 4096, 16, 347.0, 146.0),
    ("HT dispatch FP8, zero-copy", "dispatch_cached_fp8_zc", 4096, 16, 347.0, 146.0),
    ("HT combine BF16", "combine_bf16", 4096, 16, 545.0, 255.0),
    ("HT full dispatch (host sync)", "dispatch_full_bf16", 4096, 24, 383.0, 240.0),
    ("HT full dispatch (bounded)", "dispatch_bounded_bf16", 4096, 24, 383.0, 240.0),
    ("HT full dispatch (host sync), zero-copy", "dispatch_full_bf16_zc", 4096, 24, 383.0, 240.0),
    ("HT full dispatch (bounded), zero-copy", "dispatch_bounded_bf16_zc", 4096, 24, 383.0, 240.0),
    # At least 4 times faster than a plain NCCL dispatcher's 815 µs (count exchange, host sync, all-to-all).
    ("HT full dispatch (host sync), NCCL / 4", "dispatch_full_bf16", 4096, 24, None, 815.0 / 4),
    ("HT full dispatch (bounded), NCCL / 4", "dispatch_bounded_bf16", 4096, 24, None, 815.0 / 4),
    ("HT full dispatch (bounded) zero-copy, NCCL / 4", "dispatch_bounded_bf16_zc", 4096, 24, None, 815.0 / 4),
    ("HT dispatch BF16, small batch", "dispatch_cached_bf16", 512, 24, 64.0, 30.0),
    ("HT dispatch BF16 zero-copy, small batch", "dispatch_cached_bf16_zc", 512, 24, 64.0, 30.0),
    ("HT combine BF16, small batch", "combine_bf16", 512, 24, 75.0, 35.0),
    ("layout", "layout", 4096, 0, 44.0, 15.0),
    ("LL dispatch FP8", "ll_dispatch_fp8", 128, 0, 28.0, 18.0),
    ("LL combine BF16", "ll_combine_bf16", 128, 0, 39.0, 25.0),
    ("LL dispatch send phase", "ll_dispatch_send", 128, 0, 20.0, 12.0),
    ("LL combine send phase", "ll_combine_send", 128, 0, 32.0, 18.0),
    ("LL dispatch FP8", "ll_dispatch_fp8", 32, 0, 18.6, 12.0),
    ("LL combine BF16", "ll_combine_bf16", 32, 0, 18.7, 12.0),
    ("LL dispatch FP8", "ll_dispatch_fp8", 256, 0, 46.8, 30.0),
    ("LL combine BF16", "ll_combine_bf16", 256, 0, 76.5, 45.0),
    ("LL dispatch FP8", "ll_dispatch_fp8", 1, 0, None, 10.0),
    ("LL combine BF16", "ll_combine_bf16", 1, 0, None, 10.0),
)


def goals_table(rows: list[dict]) -> list[dict]:
    """Each goal of GOALS with the measured µs of its case among `rows` (the summary's rows, slowest_rows) and
    whether it is met; a case not measured has us and met None."""
    measured = {(r["case"], r["num_tokens"], r["sms"]): r["us"] for r in rows if "us" in r}
    table = []
    for what, case, n, sms, deepep, goal in GOALS:
        us = measured.get((case, n, sms))
        table.append(
            dict(
                what=what,
                case=case,
                num_tokens=n,
                sms=sms,
                deepep_us=deepep,
                goal_us=goal,
                us=us,
                met=None if us is None else us <= goal,
            )
        )
    return table


def print_goals(rows: list[dict]) -> None:
    print(f"\n{'goal (2 x H200)':<48}{'N/T':>6}{'SMs':>5}{'DeepEP':>8}{'goal':>8}{'us':>8}  verdict")
    for g in goals_table(rows):
        deepep = f"{g['deepep_us']:8.1f}" if g["deepep_us"] is not None else f"{'-':>8}"
        us = f"{g['us']:8.1f}" if g["us"] is not None else f"{'-':>8}"
        verdict = "not measured" if g["met"] is None else "met" if g["met"] else "missed"
        print(f"{g['what']:<48}{g['num_tokens']:>6}{g['sms'] or '':>5}{deepep}{g['goal_us']:8.1f}{us}  {verdict}")


def machine_description() -> str:
    try:
        from cuda.bindings import driver

        _check(driver.cuInit(0))
        name = _check(driver.cuDeviceGetName(128, _check(driver.cuDeviceGet(0))))
        name = name.split(b"\0")[0].decode()
        return f"{local_device_count()} x {name} on {platform.node()}"
    except Exception as exc:  # a description, not a requirement
        return f"unknown ({exc})"


def git_commit() -> str:
    """The commit measured: $DEEPEP_COMMIT when set, else the one the installed package was built from (written at
    build time; "-dirty" where tracked files differed from it), else "unknown". Not what git says where the bench runs:
    the package may be installed inside another repository, and the checkout may have moved on since the build."""
    if os.environ.get("DEEPEP_COMMIT"):
        return os.environ["DEEPEP_COMMIT"]
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_commit.txt")) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


def plot(record: dict, path: str) -> bool:
    """GB/s against SMs, one panel per token count, with the same-run ceiling; False where matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = record["results"][0]
    tokens = sorted({r["num_tokens"] for r in rows if "ratio" in r and r["num_tokens"] > 0})
    if not tokens:
        return False
    fig, axes = plt.subplots(1, len(tokens), figsize=(5 * len(tokens), 4), squeeze=False)
    ceiling = sorted((r["sms"], r["gbps"]) for r in rows if r["case"] == "ceiling_push")
    for ax, n in zip(axes[0], tokens, strict=False):
        for case in sorted({r["case"] for r in rows if "ratio" in r}):
            points = sorted((r["sms"], r["gbps"]) for r in rows if r["case"] == case and r["num_tokens"] == n)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=case)
        ax.plot([c[0] for c in ceiling], [c[1] for c in ceiling], "k--", label="SM-push ceiling")
        ax.set_title(f"N = {n}")
        ax.set_xlabel("SMs")
        ax.set_ylabel("remote GB/s")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"pydeepep on {record['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module's text as written, and each option's default after its help."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pydeepep.bench", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--nranks", type=int, default=None, help="ranks; when not given, one per local GPU")
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="calls before the per-call timings (layout's Python call, full and bounded dispatch); "
        "the graph-timed cases warm up with their graph's first launches",
    )
    parser.add_argument("--iters", type=int, default=100, help="timed calls (or graph replays) per case; medians")
    parser.add_argument(
        "--output",
        default="pydeepep_bench.json",
        help="where to write the JSON record (a PNG plot beside it where matplotlib is installed)",
    )
    parser.add_argument("--sms", default=",".join(map(str, SMS)), help="SM counts, comma-separated")
    parser.add_argument("--tokens", default=",".join(map(str, NUM_TOKENS)), help="tokens per rank, comma-separated")
    parser.add_argument(
        "--ll-tokens", default=",".join(map(str, LL_TOKENS)), help="low-latency tokens per rank T, comma-separated"
    )
    parser.add_argument(
        "--ll-transport",
        default="auto",
        choices=("auto", "nvshmem"),
        help="low-latency transport: auto (NVLink stores to NVLink peers) or nvshmem (NVSHMEM puts to every peer)",
    )
    parser.add_argument(
        "--modes",
        default="ht,zc,ll",
        help="which sections to run (comma-separated): ht (high-throughput), zc (its dispatches on a zero-copy "
        "communicator), ll (low-latency)",
    )
    parser.add_argument(
        "--goals",
        metavar="RECORD",
        help="print the project's goals next to the figures of RECORD (a JSON record this command wrote) and exit; "
        "needs no GPU",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the N = 0 runs (the protocol's fixed cost: launch, acknowledgements, count exchange)",
    )
    args = parser.parse_args(argv)
    modes = set(args.modes.split(","))
    if not modes <= set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(modes - set(MODES)))} (choose from {', '.join(MODES)})")
    if args.goals:
        with open(args.goals) as f:
            record = json.load(f)
        print(f"{args.goals}: commit {record['commit']}, {record['nranks']} rank(s) on {record['machine']}")
        if record["nranks"] != 2:
            print("the goals are for 2 ranks; this record is of another count: nothing to compare", file=sys.stderr)
            return 2
        print_goals(slowest_rows(record["results"]))
        return 0

    gpus = local_device_count()
    if gpus == 0:
        print(
            "python -m pydeepep.bench: no CUDA GPU is visible on this machine; the benchmark needs at least one "
            "(two or more for communication). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    nranks = args.nranks or gpus
    print(f"pydeepep {pydeepep.__version__} benchmark: {nranks} rank(s) on {machine_description()}", flush=True)
    started = time.time()
    sms_list = tuple(int(v) for v in args.sms.split(","))
    tokens_list = tuple(int(v) for v in args.tokens.split(","))
    if not args.no_floor and 0 not in tokens_list:
        tokens_list = (0, *tokens_list)
    ll_tokens = tuple(int(v) for v in args.ll_tokens.split(","))
    sections = {
        "ht": (bench_rank, (args.warmup, args.iters, sms_list, tokens_list, False), 900),
        "zc": (bench_rank, (args.warmup, args.iters, sms_list, tokens_list, True), 900),
        "ll": (bench_ll_rank, (args.iters, ll_tokens, args.ll_transport), 600),
    }
    per_rank = [[] for _ in range(nranks)]
    failed = {}  # section -> what went wrong; the record keeps what the others measured, and the exit status is 1
    for mode in MODES:
        if mode not in modes:
            continue
        fn, fn_args, timeout = sections[mode]
        try:
            rows = pydeepep.spawn(fn, nprocs=nranks, args=fn_args, timeout=timeout)
        except LaunchError as exc:
            print(f"section {mode} failed: {exc}", file=sys.stderr)
            failed[mode] = str(exc)
            continue
        per_rank = [mine + more for mine, more in zip(per_rank, rows, strict=True)]
    record = {
        "machine": machine_description(),
        "commit": git_commit(),
        "command": " ".join([sys.executable, "-m", "pydeepep.bench", *(argv if argv is not None else sys.argv[1:])]),
        "nranks": nranks,
        "started": started,
        "results": per_rank,
        "failed_sections": failed,
    }
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{'case':<25}{'N':>7}{'SMs':>5}{'us (median)':>13}{'GB/s':>8}{'ceiling':>9}{'ratio':>7}")
    for row in slowest_rows(per_rank):
        gbps = f"{row['gbps']:8.1f}" if "gbps" in row else " " * 8
        ceiling = f"{row['ceiling_gbps']:9.1f}" if "ceiling_gbps" in row else " " * 9
        ratio = f"{row['ratio']:7.0%}" if "ratio" in row else " " * 7
        us = row["us"]
        print(f"{row['case']:<25}{row['num_tokens']:>7}{row['sms'] or '':>5}{us:>13.1f}{gbps}{ceiling}{ratio}")
    if nranks == 2:
        print_goals(slowest_rows(per_rank))
    print(f"(record written to {args.output})")
    png = os.path.splitext(args.output)[0] + ".png"
    if plot(record, png):
        print(f"(plot written to {png})")
    if failed:
        print(f"FAILED sections: {', '.join(failed)} (their errors are above and in the record)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
