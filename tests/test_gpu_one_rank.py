"""GPU tier on one GPU: a communicator of one rank runs the layout, a high-throughput dispatch + combine and
low-latency dispatches + combines (decode shapes among them) against the NumPy oracle, bit for bit.

These tests need one GPU, unlike the rest of the multi-rank modules whose scenarios they reuse, so they live here: a
machine with a single GPU runs them too.
"""

import numpy as np
import pytest
from conftest import import_or_skip, requires_gpus, skip_missing
from test_gpu_ht import one_rank_ht
from test_gpu_layout import single_rank
from test_gpu_ll import one_rank_ll

import pydeepep

pytestmark = [pytest.mark.gpu, requires_gpus(1)]


def test_one_rank_communicator_works():
    assert pydeepep.spawn(single_rank, nprocs=1, timeout=120) == [(1, True)]


def test_ht_on_one_rank():
    assert pydeepep.spawn(one_rank_ht, nprocs=1, timeout=300) == [True]


def test_ll_on_one_rank():
    (result,) = pydeepep.spawn(one_rank_ll, nprocs=1, timeout=300)
    assert all(v is True for v in result.values()), result


def proxy_cpu_and_setting(info):
    """With a communicator of one rank idle for half a second: the CPU time the process spent meanwhile, as a share
    of that time (NVSHMEM's proxy thread polls a core without pause), and NVSHMEM_DISABLE_LOCAL_ONLY_PROXY as the C
    environment holds it."""
    import ctypes
    import time

    with pydeepep.Communicator(info.unique_id, 0, 1, device=0, timeout=30, max_tokens_per_rank=64, hidden=256):
        time.sleep(0.2)  # setup's own threads settle
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(0.5)
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
        getenv = ctypes.CDLL(None).getenv  # the C environment, which the library's setenv changes
        getenv.restype = ctypes.c_char_p
        value = getenv(b"NVSHMEM_DISABLE_LOCAL_ONLY_PROXY")
        return share, None if value is None else value.decode()


def communicator_after_a_closed_one(info):
    """A bad argument refused before NVSHMEM starts leaves the process free to make a communicator; once that one is
    closed, another is refused, naming why (NVSHMEM documents initialising it again after its teardown as undefined)."""
    try:  # refused inside the setup, after it took NVSHMEM's hold, before NVSHMEM starts
        pydeepep.Communicator(info.unique_id, 0, 1, device=0, timeout=30, buffer_bytes=1)
        return "a 1-byte buffer was accepted"
    except pydeepep.DeepEPInvalidArgument as exc:
        if "buffer_bytes" not in str(exc):
            return str(exc)
    with pydeepep.Communicator(info.unique_id, 0, 1, device=0, timeout=30, max_tokens_per_rank=64, hidden=256):
        pass
    try:
        pydeepep.Communicator(info.unique_id, 0, 1, device=0, timeout=30)  # refused before the id is read
        return "a second communicator was made after the first was closed"
    except pydeepep.DeepEPInvalidUsage as exc:
        return "finalised by an earlier communicator's teardown" in str(exc) or str(exc)


def test_a_process_makes_one_communicator_in_its_lifetime():
    assert pydeepep.spawn(communicator_after_a_closed_one, nprocs=1, timeout=120) == [True]


def test_the_nvshmem_proxy_thread_is_off_unless_the_environment_says_otherwise(monkeypatch):
    # Set in this process before the spawn: rank 0 makes the id, NVSHMEM's first call, before the rank's function runs.
    monkeypatch.delenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", raising=False)
    ((share, value),) = pydeepep.spawn(proxy_cpu_and_setting, nprocs=1, timeout=120)
    assert value == "1" and share < 0.2, (share, value)
    # The caller's own setting wins, and with the proxy on the measure above sees it poll.
    monkeypatch.setenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", "0")
    ((share, value),) = pydeepep.spawn(proxy_cpu_and_setting, nprocs=1, timeout=120)
    assert value == "0" and share > 0.5, (share, value)


class _ClaimedRows:
    """A CUDA array interface of `rows` rows of `cols` int64 ids, `row_elements` apart, claimed over `base` (far more
    than it holds): a call that takes it must refuse its size before it reads a byte."""

    def __init__(self, base, rows, cols, row_elements):
        self.base = base
        self.__cuda_array_interface__ = {
            "shape": (rows, cols),
            "strides": (row_elements * 8, 8),
            "typestr": "<i8",
            "data": (base.data.ptr, False),
            "version": 3,
        }


def invalid_argument_message(call):
    """The message of the DeepEPInvalidArgument `call()` raises, or "accepted" (once the device is done with it)."""
    import cupy

    try:
        call()
        cupy.cuda.runtime.deviceSynchronize()
    except pydeepep.DeepEPInvalidArgument as exc:
        return str(exc)
    return "accepted"


def layout_of_claimed_rows(info, rows, cols, row_elements):
    """What a one-rank layout of _ClaimedRows raises (its message), or "accepted"."""
    import cupy

    with pydeepep.Communicator(
        info.unique_id, 0, 1, device=0, timeout=30, max_tokens_per_rank=64, hidden=256, num_topk=1, num_experts=8
    ) as comm:
        base = cupy.zeros(16, cupy.int64)
        return invalid_argument_message(
            lambda: comm.get_dispatch_layout(_ClaimedRows(base, rows, cols, row_elements), 8)
        )


def test_a_layout_whose_rows_span_more_than_2_to_the_64_bytes_is_refused():
    # Rows 2^32 elements apart: the extent, computed in 64 bits, wraps around to a few bytes.
    import_or_skip("cupy")
    (message,) = pydeepep.spawn(layout_of_claimed_rows, nprocs=1, args=((1 << 29) + 1, 1, 1 << 32), timeout=120)
    assert "topk_idx" in message, message


def test_a_layout_of_more_slots_than_an_int32_count_holds_is_refused():
    # 2^26 tokens of top-32: 2^31 slots, one more than an expert's int32 count holds.
    import_or_skip("cupy")
    (message,) = pydeepep.spawn(layout_of_claimed_rows, nprocs=1, args=(1 << 26, 32, 32), timeout=120)
    assert "num_tokens * num_topk is 2147483648" in message, message


def dispatch_where_an_expert_count_could_pass_int32(info):
    """What a one-rank dispatch raises where max_tokens_per_rank * num_topk rows could reach one expert (2^26 * 32 =
    2^31, one more than an int32 count holds; the buffer is given, so that it is not sized for that workload)."""
    import cupy

    with pydeepep.Communicator(
        info.unique_id,
        0,
        1,
        device=0,
        timeout=30,
        buffer_bytes=64 << 20,
        max_tokens_per_rank=1 << 26,
        hidden=256,
        num_topk=32,
        num_experts=8,
    ) as comm:
        x, topk = cupy.zeros((4, 256), cupy.uint16), cupy.zeros((4, 32), cupy.int64)
        return invalid_argument_message(lambda: comm.dispatch(x, topk_idx=topk, num_experts=8))


def test_a_dispatch_whose_expert_counts_could_pass_int32_is_refused():
    # Alignment 1 used to pass the bound on expert_alignment, and an expert's count could wrap.
    import_or_skip("cupy")
    (message,) = pydeepep.spawn(dispatch_where_an_expert_count_could_pass_int32, nprocs=1, timeout=120)
    assert "num_topk = 2147483648 rows may reach one expert" in message, message


def calls_from_another_thread_during_a_call(info):
    """What a second thread's calls of the communicator raise while the first thread is inside a dispatch (in the
    allocator the dispatch calls with its row count), and whether that dispatch still gives the oracle's rows."""
    import threading
    import types

    import cupy
    from conftest import bf16_bits, bf16_values

    from pydeepep import reference

    n, h, k, e = 32, 256, 2, 4
    rng = np.random.default_rng(3)
    x = bf16_bits(rng.standard_normal((n, h)).astype(np.float32))
    topk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64)
    said = {}
    with pydeepep.Communicator(
        info.unique_id, 0, 1, device=0, timeout=30, max_tokens_per_rank=n, hidden=h, num_topk=k, num_experts=e
    ) as comm:
        x_dev, topk_dev = cupy.asarray(x), cupy.asarray(topk)
        others = {
            "close": comm.close,
            "get_dispatch_layout": lambda: comm.get_dispatch_layout(topk_dev, e),
            "dispatch": lambda: comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e),
            # Diagnostics and masks release the GIL in the library as the calls do.
            "measure_push_bandwidth": lambda: comm.measure_push_bandwidth(1, 1 << 20, 1),
            "measure_flag_round": lambda: comm.measure_flag_round(1),
            "low_latency_mask_rank": lambda: comm.low_latency_mask_rank(0, False),
            "low_latency_masked_ranks": comm.low_latency_masked_ranks,
            # The error record, which the running call may be writing, and the library's other state.
            "check_async_error": comm.check_async_error,
            "clear_async_error": comm.clear_async_error,
            "low_latency_timeline": comm.low_latency_timeline,
            "low_latency_combine_buffer": lambda: comm.low_latency_combine_buffer(None),
            "Handle()": lambda: pydeepep.Handle(comm),
        }
        spare = pydeepep.Handle(comm)
        # What frees the communicator or a handle is refused from the call's own callback too.
        own_thread = {"close()": comm.close, "Handle.close()": spare.close}

        def outcome(call):
            try:
                call()
                return "accepted"
            except pydeepep.DeepEPError as exc:
                return f"{type(exc).__name__}: {exc}"

        def allocate(rows):
            for name, call in others.items():
                worker = threading.Thread(target=lambda name=name, call=call: said.update({name: outcome(call)}))
                worker.start()
                worker.join()
            for name, call in own_thread.items():
                said[name] = outcome(call)
            return types.SimpleNamespace(
                recv_x=cupy.empty((rows, h), cupy.uint16),
                recv_scales=None,
                recv_topk_idx=cupy.empty((rows, k), cupy.int64),
                recv_topk_weights=None,
                recv_src_idx=cupy.empty((rows,), cupy.int32),
            )

        result = comm.dispatch(x_dev, topk_idx=topk_dev, num_experts=e, out=allocate)
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        want = reference.dispatch([bf16_values(x)], [topk], None, e)[0][0]
        said["the dispatch's rows match the oracle"] = bool(np.array_equal(bf16_values(result.recv_x.to_numpy()), want))
        said["open afterwards"] = not comm.closed
        spare.close()  # accepted once the call returned
    return said


def context_after_to_device(info):
    """In a thread of its own (no context current): the current context after to_device, and the array's values."""
    import threading

    from cuda.bindings import driver

    seen = {}

    def copy():
        array = pydeepep.to_device(np.arange(5, dtype=np.int32), device=0)
        _, context = driver.cuCtxGetCurrent()
        seen["context"] = int(context)
        seen["values"] = array.to_numpy().tolist()

    worker = threading.Thread(target=copy)
    worker.start()
    worker.join()
    return seen


def test_to_device_leaves_the_callers_context_as_it_was():
    (seen,) = pydeepep.spawn(context_after_to_device, nprocs=1, timeout=60)
    assert seen == {"context": 0, "values": [0, 1, 2, 3, 4]}, seen


def test_a_call_from_another_thread_during_a_call_is_refused_and_the_first_call_completes():
    import_or_skip("cupy")
    (said,) = pydeepep.spawn(calls_from_another_thread_during_a_call, nprocs=1, timeout=120)
    for name in (
        "close",
        "get_dispatch_layout",
        "dispatch",
        "measure_push_bandwidth",
        "measure_flag_round",
        "low_latency_mask_rank",
        "low_latency_masked_ranks",
        "check_async_error",
        "clear_async_error",
        "low_latency_timeline",
        "low_latency_combine_buffer",
        "Handle()",
    ):
        assert said[name].startswith("DeepEPInvalidUsage: ") and "another thread is inside a call" in said[name], said
        assert said[name].split(": ")[1].startswith(name), said
    for name in ("close()", "Handle.close()"):
        assert said[name] == (
            f"DeepEPInvalidUsage: {name}: a call of this communicator is still running (this is a callback of it, "
            "such as an out= allocator); make it after that call returns"
        ), said
    assert said["the dispatch's rows match the oracle"] is True, said
    assert said["open afterwards"] is True, said


def array_released_during_a_capture(info):
    """An array made on a stream and released while that stream captures a CUDA graph: its free waits for the next
    allocation (a free inside the capture would be a node of the graph, which frees only its own memory, and the
    capture would fail). Returns the frees held back after the release and after the next allocation, and whether
    the graph ran."""
    import cupy

    from pydeepep import _core
    from pydeepep.bench import CapturedGraph

    stream = cupy.cuda.Stream(non_blocking=True)
    handle = stream.ptr
    kept = [pydeepep.empty((4096,), "uint8", device=0, stream=handle)]
    held = []

    def release():
        kept.clear()
        held.append(len(_core._deferred_frees))

    graph = CapturedGraph(release, handle)
    graph.launch()
    stream.synchronize()
    pydeepep.empty((16,), "uint8", device=0, stream=handle)
    held.append(len(_core._deferred_frees))
    graph.close()
    stream.synchronize()
    return held


def test_an_array_released_while_its_stream_captures_a_graph_is_freed_after_the_capture():
    import_or_skip("cupy")
    assert pydeepep.spawn(array_released_during_a_capture, nprocs=1, timeout=120) == [[1, 0]]


def one_rank_ll_communicator(info, hidden, experts, tokens):
    """A communicator of one rank on GPU 0 for low-latency calls of up to `tokens` tokens with top-2 routing."""
    return pydeepep.Communicator(
        info.unique_id,
        0,
        1,
        device=0,
        timeout=30,
        max_tokens_per_rank=16,
        hidden=hidden,
        num_topk=2,
        num_experts=experts,
        low_latency_max_tokens=tokens,
    )


def close_while_a_call_runs(info):
    """A low-latency dispatch queued behind a kernel that holds its stream for a second, then close() at once.
    Returns the seconds close() took, whether the stream had finished by then, and the dispatch's rows against the
    oracle's (True or the first mismatch)."""
    import time

    import cupy
    from conftest import bf16_bits, bf16_values
    from test_gpu_bad_input import SPIN_SOURCE
    from test_gpu_ll import check_dispatch

    from pydeepep import reference

    hidden, experts, tokens = 256, 4, 8
    rng = np.random.default_rng(11)
    x = bf16_values(bf16_bits(rng.standard_normal((tokens, hidden)).astype(np.float32)))
    topk = np.stack([rng.permutation(experts)[:2] for _ in range(tokens)]).astype(np.int64)
    topk[1, 0] = topk[5, 1] = -1
    want = reference.low_latency_dispatch([x], [topk], experts, tokens, False, False)[0]
    with cupy.cuda.Device(0):
        stream = cupy.cuda.Stream(non_blocking=True)
        spin = cupy.RawKernel(SPIN_SOURCE, "spin")
        x_dev, topk_dev = cupy.asarray(bf16_bits(x)), cupy.asarray(topk)
        cupy.cuda.runtime.deviceSynchronize()
        with one_rank_ll_communicator(info, hidden, experts, tokens) as comm:
            # The first low-latency call sets its buffers up and waits for the stream: made once before the spin.
            comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False, stream=stream)
            stream.synchronize()
            with stream:
                spin((1,), (1,), (np.uint64(1_000_000_000),))
            result = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False, stream=stream)
            start = time.monotonic()
            comm.close()
            seconds = time.monotonic() - start
            finished = stream.done
        return seconds, finished, check_dispatch(result, want, [(x, topk, None)], 0, experts, 1, False, False)


def test_close_waits_for_calls_still_running_on_their_streams():
    """close() frees what a running call uses (its flags, the buffer it writes into): it waits for the device first,
    not only for the communicator's own stream."""
    import_or_skip("cupy")
    ((seconds, finished, rows),) = pydeepep.spawn(close_while_a_call_runs, nprocs=1, timeout=120)
    assert finished is True, "close() returned with the dispatch's stream still running"
    assert seconds > 0.8, f"close() took {seconds:.2f} s; the spin in front of the dispatch holds the stream 1 s"
    assert rows is True, rows


def ll_arrays_shared_by_both_buffer_sets(info):
    """Low-latency dispatches on the two buffer sets given the same arrays as out=, through an object that is not the
    first dispatch's result: the first result's combine is refused once the second wrote there, and the second
    dispatch is refused while the first one's receive, which writes those arrays, is still due, leaving them on the
    stream of that receive."""
    import types

    import cupy
    from conftest import bf16_bits, bf16_values
    from test_gpu_ll import check_dispatch

    from pydeepep import reference

    hidden, experts, tokens = 256, 4, 8
    rng = np.random.default_rng(17)
    x = bf16_values(bf16_bits(rng.standard_normal((tokens, hidden)).astype(np.float32)))
    topk = np.stack([rng.permutation(experts)[:2] for _ in range(tokens)]).astype(np.int64)
    w = rng.random((tokens, 2)).astype(np.float32)
    want = reference.low_latency_dispatch([x], [topk], experts, tokens, False, False)[0]
    y = want[0]  # the dispatched rows as the expert outputs
    (want_out,) = reference.low_latency_combine([y], [topk], [w], [want[3]])
    want_bits = (want_out.view(np.uint32) >> 16).astype(np.uint16)
    fields = ("recv_x", "recv_scales", "recv_count", "recv_src_info", "recv_layout_range")

    def same_arrays(result):
        return types.SimpleNamespace(**{name: getattr(result, name) for name in fields})

    def refusal(call):
        try:
            call()
        except pydeepep.DeepEPInvalidUsage as exc:
            return str(exc)
        return "accepted"

    seen = {}
    with one_rank_ll_communicator(info, hidden, experts, tokens) as comm:
        x_dev, topk_dev, w_dev, y_dev = (cupy.asarray(a) for a in (bf16_bits(x), topk, w, bf16_bits(y)))
        first = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False)  # set 0
        second = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False, out=same_arrays(first))  # set 1
        seen["combine of the first"] = refusal(lambda: comm.low_latency_combine(y_dev, topk_dev, w_dev, first))
        combined = comm.low_latency_combine(y_dev, topk_dev, w_dev, second).out
        seen["combine of the second"] = np.array_equal(combined.to_numpy(), want_bits) or "differs from the oracle's"
        sending, other = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.runtime.deviceSynchronize()  # the calls so far ran on the default stream
        third = comm.low_latency_dispatch(
            x_dev, topk_dev, experts, use_fp8=False, return_recv_hook=True, stream=sending
        )  # set 0
        seen["dispatch into the due receive's arrays"] = refusal(
            lambda: comm.low_latency_dispatch(
                x_dev, topk_dev, experts, use_fp8=False, out=same_arrays(third), stream=other
            )
        )
        streams = {getattr(third, name).stream for name in fields if getattr(third, name) is not None}
        seen["third's arrays' streams"] = streams == {sending.ptr} or f"{streams} (sent on {sending.ptr})"
        other.synchronize()  # the refused dispatch's side, before the receive
        third.hook()
        cupy.cuda.runtime.deviceSynchronize()
        seen["third"] = check_dispatch(third, want, [(x, topk, w)], 0, experts, 1, False, False)
        # A combine's out= that the other set's due combine receive writes: refused, and left on that receive's stream.
        on_0 = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False, stream=sending)
        on_1 = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=False, stream=sending)
        cupy.asarray(combined.bits()).fill(0)  # the due receive writes it again
        cupy.cuda.runtime.deviceSynchronize()
        due = comm.low_latency_combine(
            y_dev, topk_dev, w_dev, on_0, out=combined, return_recv_hook=True, stream=sending
        ).hook
        seen["combine into the due combine's output"] = refusal(
            lambda: comm.low_latency_combine(y_dev, topk_dev, w_dev, on_1, out=combined, stream=other)
        )
        seen["the output's stream"] = combined.stream == sending.ptr or f"{combined.stream} (sent on {sending.ptr})"
        other.synchronize()
        due()
        cupy.cuda.runtime.deviceSynchronize()
        seen["the due combine"] = np.array_equal(combined.to_numpy(), want_bits) or "differs from the oracle's"
    return seen


def test_low_latency_arrays_given_to_both_buffer_sets_are_caught_whatever_object_carries_them():
    import_or_skip("cupy")
    (seen,) = pydeepep.spawn(ll_arrays_shared_by_both_buffer_sets, nprocs=1, timeout=120)
    assert "were written over by a later call's outputs" in seen["combine of the first"], seen
    assert seen["combine of the second"] is True, seen
    assert "receive hook was not called yet" in seen["dispatch into the due receive's arrays"], seen
    assert seen["third's arrays' streams"] is True, seen
    assert "arrays of the combine sent on buffer set 0" in seen["combine into the due combine's output"], seen
    assert seen["the output's stream"] is True, seen
    assert seen["the due combine"] is True, seen
    assert seen["third"] is True, seen


def nonfinite_ll(info):
    """Low-latency calls on rows holding NaN and infinities, against the oracle: the FP8 cast (the block maximum
    skips NaN; an infinite channel gives an infinite scale), BF16 rows unchanged, and the combine's NaN pattern."""
    import cupy
    from conftest import bf16_bits, bf16_values
    from test_gpu_ll import check_dispatch

    from pydeepep import reference

    hidden, experts, tokens = 256, 2, 4
    rng = np.random.default_rng(5)
    x = bf16_values(bf16_bits(rng.standard_normal((3, hidden)).astype(np.float32)))
    x[0, 5], x[1, 130], x[2, 7] = np.nan, np.inf, -np.inf
    topk = np.array([[0, 1], [1, -1], [0, -1]], np.int64)
    w = rng.random((3, 2)).astype(np.float32)
    out = {}
    with one_rank_ll_communicator(info, hidden, experts, tokens) as comm:
        x_dev, topk_dev = cupy.asarray(bf16_bits(x)), cupy.asarray(topk)
        for use_fp8, round_scale in ((True, False), (True, True), (False, False)):
            want = reference.low_latency_dispatch([x], [topk], experts, tokens, use_fp8, round_scale)[0]
            result = comm.low_latency_dispatch(x_dev, topk_dev, experts, use_fp8=use_fp8, round_scale=round_scale)
            cupy.cuda.runtime.deviceSynchronize()
            name = f"dispatch fp8={use_fp8} round_scale={round_scale}"
            out[name] = check_dispatch(result, want, [(x, topk, w)], 0, experts, 1, use_fp8, False)
        # The BF16 dispatch's rows, NaN and infinities among them, as the expert outputs.
        y = want[0]
        got = comm.low_latency_combine(cupy.asarray(bf16_bits(y)), topk_dev, cupy.asarray(w), result).out.to_numpy()
        (want_out,) = reference.low_latency_combine([y], [topk], [w], [want[3]])
        want_bits = (want_out.view(np.uint32) >> 16).astype(np.uint16)
        out["combine"] = np.array_equal(got, want_bits) or f"{got[:, :8].tolist()} != {want_bits[:, :8].tolist()}"
        try:  # non-finite values are data, not faults
            comm.check_async_error()
        except pydeepep.DeepEPError as exc:
            out["asynchronous error"] = repr(exc)
    return out


def out_exported_as_a_temporary(info):
    """A low-latency combine into an out= object whose __dlpack__ exports a new CuPy array each time (its memory then
    belongs to the capsule alone). Returns whether that array lived while the result did, whether the result's rows
    match the oracle, and whether the array was freed once the result was gone."""
    import gc
    import weakref

    import cupy
    from conftest import bf16_bits, bf16_values, exact_equal
    from test_gpu_ll import make_inputs

    from pydeepep import reference

    hidden, experts, tokens = 256, 4, 8
    x, topk, weights = make_inputs(12, 0, tokens, hidden, 2, experts, 1)
    want = reference.low_latency_dispatch([bf16_values(x)], [topk], experts, tokens)
    ys = bf16_bits(np.random.default_rng(13).standard_normal((experts, tokens, hidden)))
    want_out = reference.low_latency_combine([bf16_values(ys)], [topk], [weights], [want[0][3]])[0]
    exported = []

    class Temporary:
        def __dlpack__(self, **kwargs):
            array = cupy.empty((tokens, hidden), cupy.uint16)
            exported.append(weakref.ref(array))
            return array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA, device 0

    with cupy.cuda.Device(0), one_rank_ll_communicator(info, hidden, experts, tokens) as comm:
        topk_dev = cupy.asarray(topk)
        handle = comm.low_latency_dispatch(cupy.asarray(x), topk_dev, experts)
        out = comm.low_latency_combine(cupy.asarray(ys), topk_dev, cupy.asarray(weights), handle, out=Temporary()).out
        cupy.cuda.runtime.deviceSynchronize()
        pydeepep.empty_cache()  # the call's own hold let go: the result alone holds the array now
        gc.collect()
        lived = len(exported) == 1 and exported[0]() is not None
        rows = exact_equal(bf16_values(out.to_numpy()), want_out)
        del out
        cupy.cuda.runtime.deviceSynchronize()
        pydeepep.empty_cache()  # lets go of what finished calls held
        gc.collect()
        freed = exported[0]() is None
    return lived, rows, freed


def test_an_out_array_whose_memory_belongs_to_its_dlpack_capsule_lives_as_long_as_the_result():
    import_or_skip("cupy")
    assert pydeepep.spawn(out_exported_as_a_temporary, nprocs=1, timeout=120) == [(True, True, True)]


def arrays_of_a_held_call(info):
    """get_dispatch_layout queued behind a kernel that holds its stream for half a second, every array it takes (the
    routing and the three out= arrays) from a producer whose __dlpack__ exports a new CuPy view each time, of memory
    the test keeps: the view is all that the DLPack capsule holds. Returns whether the views lived on after the call
    returned, whether the next call let them go once the stream was done, and whether the counts are right."""
    import gc
    import weakref

    import cupy
    from test_gpu_bad_input import SPIN_SOURCE

    tokens, experts = 64, 8
    rng = np.random.default_rng(14)
    topk = np.stack([rng.permutation(experts)[:2] for _ in range(tokens)]).astype(np.int64)
    topk[rng.random(topk.shape) < 0.2] = -1
    exported = []

    class ViewEachTime:
        def __init__(self, base):
            self.base = base

        def __dlpack__(self, **kwargs):
            view = self.base[...]
            exported.append(weakref.ref(view))
            return view.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return (2, 0)  # kDLCUDA, device 0

    with cupy.cuda.Device(0), one_rank_ll_communicator(info, 256, experts, 8) as comm:
        stream = cupy.cuda.Stream(non_blocking=True)
        routing = cupy.asarray(topk)
        outs = (cupy.zeros((1,), cupy.int32), cupy.zeros((experts,), cupy.int32), cupy.zeros((tokens, 1), cupy.bool_))
        comm.get_dispatch_layout(routing, experts, stream=stream)  # a first call's setup may wait for the stream
        cupy.cuda.runtime.deviceSynchronize()
        with stream:
            cupy.RawKernel(SPIN_SOURCE, "spin")((1,), (1,), (np.uint64(500_000_000),))
        comm.get_dispatch_layout(ViewEachTime(routing), experts, stream=stream, out=tuple(map(ViewEachTime, outs)))
        gc.collect()
        lived = len(exported) == 4 and all(ref() is not None for ref in exported) and not stream.done
        stream.synchronize()
        comm.get_dispatch_layout(
            routing, experts, stream=stream
        )  # it holds arrays too, then lets go of what finished calls held
        gc.collect()
        released = all(ref() is None for ref in exported)
        valid = topk >= 0
        counts = (
            int(cupy.asnumpy(outs[0])[0]) == int(valid.any(axis=1).sum())
            and np.array_equal(cupy.asnumpy(outs[1]), np.bincount(topk[valid], minlength=experts))
            and np.array_equal(cupy.asnumpy(outs[2])[:, 0], valid.any(axis=1))
        )
    return lived, released, counts


def test_the_arrays_a_call_takes_live_until_its_work_is_done():
    """A call holds the arrays of other libraries it reads or writes (through the DLPack capsules taken from them)
    until the work it queued is done: a temporary passed straight in is safe."""
    import_or_skip("cupy")
    assert pydeepep.spawn(arrays_of_a_held_call, nprocs=1, timeout=120) == [(True, True, True)]


def to_device_round_trips(info):
    """Whether to_device, then to_numpy, gives back each array's shape and values: a 0-d array, a transposed one
    (not C-contiguous) and a big-endian one."""
    arrays = [np.array(5, np.int32), np.arange(12, dtype=np.float32).reshape(3, 4).T, np.arange(4, dtype=">i4")]
    back = [pydeepep.to_device(a, device=0).to_numpy() for a in arrays]
    return [b.shape == a.shape and np.array_equal(b, a) for a, b in zip(arrays, back, strict=True)]


def test_to_device_keeps_the_shape_and_values_of_any_array():
    assert pydeepep.spawn(to_device_round_trips, nprocs=1, timeout=120) == [[True, True, True]]


def test_nan_and_infinities_in_low_latency_rows_follow_the_oracle_bit_for_bit():
    import_or_skip("cupy")
    (result,) = pydeepep.spawn(nonfinite_ll, nprocs=1, timeout=120)
    assert all(v is True for v in result.values()), result


def run_c_test(tmp_path, name):
    """Builds tests/c/<name>.c against the installed library and runs it: the completed process."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if shutil.which("cc") is None or not (cuda_home / "include" / "cuda.h").exists():
        skip_missing("needs a C compiler and the CUDA toolkit headers")
    binary = tmp_path / name
    lib_dir = pydeepep.get_lib_dir()
    source = Path(__file__).resolve().parent / "c" / f"{name}.c"
    build = subprocess.run(
        ["cc", "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", str(source), f"-I{pydeepep.get_include()}",
         f"-I{cuda_home / 'include'}", f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}", "-ldeepep",
         f"-L{cuda_home / 'lib64'}", f"-Wl,-rpath,{cuda_home / 'lib64'}", "-lcudart", "-lpthread", "-o", str(binary)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr)
    return result


def test_calls_from_a_thread_with_no_context_leave_it_none_and_make_none_on_gpu_0(tmp_path):
    """tests/c/context_guard.c: a C worker thread that never chose a device calls the layout of a communicator on the
    last GPU three times; each call's device guard gives the thread back with no context current, and (with two GPUs
    or more) GPU 0 gets none."""
    result = run_c_test(tmp_path, "context_guard")
    if result.returncode == 2:
        pytest.skip(
            f"the worker's checks held; GPU 0 had a context before the calls, so its part says nothing: {result.stdout}"
        )
    assert result.returncode == 0, result.stdout + result.stderr


def test_high_throughput_rules_from_c(tmp_path):
    """tests/c/ht_checks.c: an error the application left on the thread does not fail the next layout; a dispatch with
    num_topk > 0 and no topk_idx is refused naming topk_idx, and one with a negative num_topk naming it; with num_topk
    0 the rows arrive unchanged; a 64-bit id past int32 travels as -1; a rank with no tokens may pass NULL ids with
    num_topk > 0; a destroyed handle stays refused after another is created, which a second destroy of it leaves
    live."""
    result = run_c_test(tmp_path, "ht_checks")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("as expected") == 20, result.stdout


def test_low_latency_phases_out_of_order_are_refused_from_c(tmp_path):
    """tests/c/ll_phases.c: a Recv with no Send due, a Send on a set whose Recv is due and a Recv of the other kind
    return deepepInvalidUsage, and so do refusals of such calls; a call refused inside a capture leaves its set
    checked; the calls in order succeed, a captured Send is received by eager Recvs after each launch of its graph; a
    combine given a routing array of the other set's dispatch, routing arrays a later call wrote over, other sizes than
    its dispatch's, or after its dispatch was refused on this rank, is refused; a combine through a 0.2.1 header's
    struct reads nothing past it, one with statistics in host memory is refused; the stream ends clean; and taking this
    rank back does nothing while masking it is refused."""
    result = run_c_test(tmp_path, "ll_phases")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("as expected") == 38, result.stdout
    assert "rank 0 is this rank: a rank cannot mask itself" in result.stdout, result.stdout
    assert "stats_wait_ns (0x" in result.stdout and "must be device memory" in result.stdout, result.stdout
    for refusal in (
        "src_info is a routing array of the dispatch on buffer set 1, not of this combine's buffer set 0",
        "num_tokens 7, num_topk 2, num_experts 4: the dispatch on buffer set 1 had 8, 2, 4",
        "of the dispatch on buffer set 1 were written over by a later call's outputs",
        "no low-latency dispatch on buffer set 1 has written routing on this rank",
    ):
        assert refusal in result.stdout, (refusal, result.stdout)
