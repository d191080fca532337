"""GPU tier for the PyTorch adapter: DeepEP-style code (`import pydeepep.torch as deep_ep`) on RANKS ranks (conftest),
through torch tensors, against the NumPy oracle: high-throughput calls on a normal Buffer, and the low-latency calls
(plus high-throughput ones) on a low_latency_mode Buffer, each in its own job."""

import os
import tempfile
import time
import traceback

import numpy as np
import pytest
from conftest import (
    RANKS,
    all_true,
    bf16_bits,
    e4m3_values,
    import_or_skip,
    one_rank_refusal_failures,
    requires_ranks,
    spawn_ranks,
)

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(RANKS)]
torch = import_or_skip("torch")

N, H, K, E = 512, 1024, 4, 16


def inputs(rank):
    rng = np.random.default_rng(rank)
    x = reference.bf16_round(rng.standard_normal((N, H)).astype(np.float32))
    topk = np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < 0.2] = -1
    return x, topk, rng.random((N, K)).astype(np.float32)


def torch_inputs(rank):
    """inputs(rank) as CUDA tensors: x bfloat16, topk_idx int64, weights float32."""
    x_np, topk_np, w_np = inputs(rank)
    return (
        torch.from_numpy(x_np).cuda().to(torch.bfloat16),
        torch.from_numpy(topk_np).cuda(),
        torch.from_numpy(w_np).cuda(),
    )


def dispatch_with_layout(buffer, x, topk, weights, layout, **options):
    """DeepEP's dispatch with the layout's counts (and `options`): (recv_x, recv_idx, recv_w, counts, handle, event)."""
    per_rank, _, per_expert, in_rank, _ = layout
    return buffer.dispatch(
        x,
        num_tokens_per_rank=per_rank,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=topk,
        topk_weights=weights,
        **options,
    )


def same_bits(a, b) -> bool:
    """Whether two tensors have the same dtype, shape and bits (torch.equal calls -0.0 and 0.0 equal, NaN unequal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def matches(tensor, values) -> bool:
    """Whether a tensor holds the oracle's `values` bit for bit, shape included (np.array_equal calls -0.0 and 0.0
    equal): bfloat16 and float32 by their bit patterns, integers and booleans by value."""
    got, values = tensor.detach().cpu(), np.asarray(values)
    if tuple(got.shape) != values.shape:
        return False
    if got.dtype == torch.bfloat16:
        return bool(np.array_equal(got.view(torch.int16).numpy().view(np.uint16), bf16_bits(values)))
    if got.dtype == torch.float32:
        return bool(np.array_equal(got.numpy().view(np.uint32), values.astype(np.float32).view(np.uint32)))
    return bool(np.array_equal(got.numpy(), values))


def tensors_of(values):
    """The tensors among `values`, FP8 (payload, scales) pairs opened."""
    flat = [v for value in values for v in (value if isinstance(value, tuple) else (value,))]
    return [v for v in flat if isinstance(v, torch.Tensor)]


def torch_allocations(call, unreturned=0):
    """Runs `call` (which returns a tuple of results): ``(verdict, results)``. The verdict is True where PyTorch's
    allocator served exactly one request per tensor returned, plus `unreturned` outputs the call makes and drops, and
    nothing else (no copy of an input, no temporary), in blocks of at least the returned tensors' bytes; else a
    message.

    Read from memory_stats' cumulative counters, which frees do not move: "allocation.all.allocated" counts every
    request once, whether a cached block or a new cudaMalloc serves it, so the count is exact; the bytes,
    "allocated_bytes.all.allocated", are the sizes of the blocks handed out (as memory_allocated() counts them), which
    are rounded up to 512 bytes and, above 1 MiB, may be a whole cached block that is not split, so they bound the
    outputs' bytes only from below."""

    def counters():
        stats = torch.cuda.memory_stats()
        return stats["allocation.all.allocated"], stats["allocated_bytes.all.allocated"]

    requests, nbytes = counters()
    results = call()
    after = counters()
    made, grew = after[0] - requests, after[1] - nbytes
    outputs = tensors_of(results)
    needed = sum(t.nbytes for t in outputs)
    if made != len(outputs) + unreturned:
        return f"{made} allocations for {len(outputs)} outputs returned and {unreturned} not", results
    if not grew >= needed > 0:
        return f"allocations of {grew} bytes for outputs of {needed}", results
    return True, results


def worst_case_case(buffer, x, topk, weights, layout, mine, want_out, nranks):
    """A worst-case dispatch (num_worst_tokens = R*N, which always holds: a token reaches a rank at most once):
    outputs of that many rows whose first rows are the exact dispatch's, padding rows with top-k ids -1 and weights 0
    (pydeepep's worst-case semantics), and an empty per-expert list (DeepEP's); then its combine matches the oracle,
    with NaN written into the padding rows of x and weights (no token maps to them, so none may be read)."""
    rows = nranks * N
    recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_with_layout(
        buffer, x, topk, weights, layout, num_worst_tokens=rows
    )
    m = mine[4].shape[0]  # rows received
    received = [t[:m].clone() for t in (recv_x, recv_idx, recv_w)]
    padding = [recv_idx[m:].cpu(), recv_w[m:].cpu()]
    recv_x[m:] = float("nan")
    recv_w[m:] = float("nan")
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    shapes = [tuple(t.shape) for t in (recv_x, recv_idx, recv_w)]
    if shapes != [(rows, H), (rows, K), (rows, K)] or recv_x.dtype != torch.bfloat16:
        return f"worst-case outputs are {recv_x.dtype} of shapes {shapes}"
    if m >= rows:
        return f"{m} rows arrived: no padding rows to check"
    if counts != []:
        return f"num_recv_tokens_per_expert_list is {counts}; it is empty in worst-case mode"
    if not all(matches(got, want) for got, want in zip(received, mine[:3], strict=True)):
        return "the received rows differ from the oracle's"
    if not (matches(padding[0], np.full((rows - m, K), -1)) and matches(padding[1], np.zeros((rows - m, K)))):
        return "padding rows do not have top-k ids -1 and weights 0"
    if not (matches(combined, want_out[0]) and matches(combined_w, want_out[1])):
        return "the combine of the worst-case dispatch differs from the oracle's"
    return True


def bias_case(buffer, recv_x, recv_w, handle, want, me, nranks):
    """Combines with DeepEP's bias forms, a pair of tensors and pairs holding one None, against the oracle (float32
    sum of the rows, then bias 0, then bias 1, rounded once to BF16)."""
    biases_np = [
        reference.bf16_round(np.random.default_rng([me, 97, i]).standard_normal((N, H)).astype(np.float32))
        for i in range(2)
    ]
    b0, b1 = (torch.from_numpy(b).cuda().to(torch.bfloat16) for b in biases_np)
    forms = {  # what is passed -> the biases the oracle adds, in order
        "(bias_0, bias_1)": ((b0, b1), tuple(biases_np)),
        "(bias_0, None)": ((b0, None), (biases_np[0],)),
        "(None, bias_1)": ((None, b1), (biases_np[1],)),
    }
    failures = []
    for name, (given, added) in forms.items():
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, bias=given)
        biases = [None] * nranks  # only this rank's result is compared
        biases[me] = added
        want_out = reference.combine(
            [w[0] for w in want], [w[4] for w in want], [N] * nranks, biases, topk_weights=[w[2] for w in want]
        )[me]
        if not matches(combined, want_out[0]):
            failures.append(f"bias={name}: output differs")
        if not matches(combined_w, want_out[1]):
            failures.append(f"bias={name}: combined weights differ")
    return "; ".join(failures) or True


def alignment_case(buffer, x, topk, weights, layout, everyone, mine, me):
    """expert_alignment = 128: the per-expert list holds each count rounded up to it (as the oracle rounds); the rows
    are those of an unaligned dispatch."""
    alignment = 128
    recv_x, recv_idx, recv_w, counts, _, _ = dispatch_with_layout(
        buffer, x, topk, weights, layout, expert_alignment=alignment
    )
    want = reference.dispatch(
        [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], E, alignment
    )
    aligned = [int(c) for c in want[me][3]]
    if aligned == [int(c) for c in mine[3]]:
        return f"the unaligned counts {mine[3].tolist()} are multiples of {alignment} already: nothing is checked"
    if counts != aligned:
        return f"num_recv_tokens_per_expert_list {counts} != {aligned}"
    if not all(matches(got, expected) for got, expected in zip((recv_x, recv_idx, recv_w), want[me][:3], strict=True)):
        return "the rows of the aligned dispatch differ from the oracle's"
    return True


def repeat_case(buffer, x, topk, weights, layout, mine, want_out, repeats=5):
    """The same exact-size dispatch and combine made `repeats` times: every run's tensors hold the bits of the first
    run's, which match the oracle, and every per-expert list is the first's."""
    names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "combined_x", "combined_topk_weights")
    runs = []
    for _ in range(repeats):
        recv_x, recv_idx, recv_w, counts, handle, _ = dispatch_with_layout(buffer, x, topk, weights, layout)
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        runs.append(((recv_x, recv_idx, recv_w, combined, combined_w), counts))
    first, first_counts = runs[0]
    wanted = (mine[0], mine[1], mine[2], want_out[0], want_out[1])
    for name, got, expected in zip(names, first, wanted, strict=True):
        if not matches(got, expected):
            return f"run 0: {name} differs from the oracle's"
    if first_counts != [int(c) for c in mine[3]]:
        return f"run 0: per-expert list {first_counts} != {mine[3].tolist()}"
    for i, (tensors, counts) in enumerate(runs[1:], start=1):
        if counts != first_counts:
            return f"run {i}: per-expert list {counts} != {first_counts}"
        for name, got, expected in zip(names, tensors, first, strict=True):
            if not same_bits(got, expected):
                return f"run {i}: {name} differs from run 0's"
    return True


def in_place_case(buffer, handle, x, topk, weights, recv_x, recv_w, mine, want_out, fp8):
    """Inputs the adapter must read where they are: x with padded rows (a strided view, which .contiguous() would
    copy), row-major FP8 scales, and a strided combine input. Each call makes PyTorch allocations for its outputs only
    (and, in a dispatch, the recv_src_idx it drops), and its results match the oracle. `fp8`: (payload tensor,
    row-major scales tensor, expected payload bits, expected scales)."""
    failures = []
    wide = torch.zeros((N, H + 64), dtype=torch.bfloat16, device="cuda")
    wide[:, :H] = x
    strided_x = wide[:, :H]
    verdict, (got_x, got_idx, got_w) = torch_allocations(
        lambda: buffer.dispatch(strided_x, handle=handle, topk_idx=topk, topk_weights=weights)[:3], unreturned=1
    )
    if strided_x.is_contiguous() or verdict is not True:
        failures.append(f"strided x: {verdict}")
    elif not all(matches(got, want) for got, want in zip((got_x, got_idx, got_w), mine[:3], strict=True)):
        failures.append("strided x: the received rows differ from the oracle's")

    q, scales, want_q, want_s = fp8
    verdict, ((got_q, got_s), _, _) = torch_allocations(
        lambda: buffer.dispatch((q, scales), handle=handle, topk_idx=topk, topk_weights=weights)[:3], unreturned=1
    )
    if scales.stride() != (scales.shape[1], 1) or verdict is not True:
        failures.append(f"row-major FP8 scales: {verdict}")
    elif not (matches(got_q.view(torch.uint8), want_q) and matches(got_s, want_s)):
        failures.append("row-major FP8 scales: the received rows differ from the oracle's")

    wide_y = torch.zeros((recv_x.shape[0], H + 64), dtype=torch.bfloat16, device="cuda")
    wide_y[:, :H] = recv_x
    strided_y = wide_y[:, :H]
    verdict, (combined, combined_w) = torch_allocations(
        lambda: buffer.combine(strided_y, handle, topk_weights=recv_w)[:2]
    )
    if strided_y.is_contiguous() or verdict is not True:
        failures.append(f"strided combine input: {verdict}")
    elif not (matches(combined, want_out[0]) and matches(combined_w, want_out[1])):
        failures.append("strided combine input: the output differs from the oracle's")
    return "; ".join(failures) or True


def ht_refusal_case(buffer, x, topk, weights, per_expert, handle, recv_x, me, nranks):
    """High-throughput calls refused on the last rank: by the adapter itself, before pydeepep has them (an option it
    refuses, an FP8 pair without its scales), or by pydeepep (a bias that is no tensor, which the adapter hands on as
    it is): that rank raises its error and its side of the call still runs, so the others finish at once with
    DeepEPRemoteError naming it (not the timeout), and the ranks stay in step: a cached dispatch and a combine
    afterwards run everywhere."""
    refuser = nranks - 1
    bad = me == refuser
    calls = {  # what -> (the call, what the refusing rank raises)
        "exact-size dispatch with allocate_on_comm_stream but no async_finish": (
            lambda: buffer.dispatch(
                x, topk_idx=topk, topk_weights=weights, num_tokens_per_expert=per_expert, allocate_on_comm_stream=bad
            ),
            pydeepep.DeepEPInvalidArgument,
        ),
        "cached dispatch of an FP8 pair without its scales": (
            lambda: buffer.dispatch((x,) if bad else x, handle=handle, topk_idx=topk, topk_weights=weights),
            IndexError,
        ),
        "combine with a bias that is no tensor": (
            lambda: buffer.combine(recv_x, handle, bias="no tensor" if bad else None),
            pydeepep.DeepEPInvalidArgument,
        ),
    }
    failures = one_rank_refusal_failures(buffer.comm, calls, refuser, torch.cuda.synchronize)
    # The same cached dispatch again, and its combine on every rank: the refusing rank's with its exception's
    # refused_handle, which runs its side of the combine, so that the others' combine ends at once.
    start = time.monotonic()
    refused = got = said = None
    try:
        got = buffer.dispatch((x,) if bad else x, handle=handle, topk_idx=topk, topk_weights=weights)
    except IndexError as exc:
        refused = getattr(exc, "refused_handle", None)
    if bad and refused is None:
        failures.append("the refused cached dispatch left no refused_handle")
    try:
        buffer.combine(recv_x if bad else got[0], refused if bad else handle)
        torch.cuda.synchronize()
        buffer.comm.check_async_error()
    except Exception as exc:
        said = exc
    finally:
        buffer.comm.clear_async_error()
    if bad and not (isinstance(said, pydeepep.DeepEPInvalidUsage) and "refused_handle" in str(said)):
        failures.append(f"the combine with refused_handle gave {said!r}")
    if not bad and not (isinstance(said, pydeepep.DeepEPRemoteError) and f"rank {refuser} refused" in str(said)):
        failures.append(f"the combine of the refused dispatch gave {said!r}")
    if time.monotonic() - start > 5:
        failures.append(f"the refused dispatch and its combine took {time.monotonic() - start:.1f} s")
    # Made on every rank whatever the verdicts, so that the ranks stay in step for the steps after this one.
    again = buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=weights)
    buffer.combine(again[0], handle, topk_weights=again[2])
    torch.cuda.synchronize()
    return "; ".join(failures) if failures else True


def adapter_rank(info, init_file):
    import torch.distributed as dist

    import pydeepep.torch as deep_ep

    out = {}
    torch.cuda.set_device(info.device)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=info.rank, world_size=info.nranks)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, int(256e6), 0)
        everyone = [inputs(r) for r in range(info.nranks)]
        x_np, topk_np, w_np = everyone[info.rank]
        x, topk, weights = torch_inputs(info.rank)
        layout = buffer.get_dispatch_layout(topk, E)
        per_rank, per_rdma, per_expert, in_rank, _ = layout
        want_layout = reference.dispatch_layout(topk_np, E, info.nranks)
        out["layout"] = (
            per_rdma is None
            and np.array_equal(per_rank.cpu().numpy(), want_layout[0])
            and np.array_equal(per_expert.cpu().numpy(), want_layout[1])
            and np.array_equal(in_rank.cpu().numpy(), want_layout[2])
        )
        recv_x, recv_idx, recv_w, counts, handle, event = dispatch_with_layout(
            buffer, x, topk, weights, layout, async_finish=True
        )
        # The communicator's stream reads the inputs after the call returns: they are kept (and recorded on it).
        out["async_keeps_inputs"] = event.extra_tensors is not None and all(
            any(kept is t for kept in event.extra_tensors) for t in (x, topk, weights)
        )
        event.current_stream_wait()
        want = reference.dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], E)
        mine = want[info.rank]
        out["dispatch"] = (
            recv_x.dtype == torch.bfloat16
            and np.array_equal(recv_x.float().cpu().numpy(), mine[0])
            and np.array_equal(recv_idx.cpu().numpy(), mine[1])
            and np.array_equal(recv_w.cpu().numpy(), mine[2])
            and counts == [int(c) for c in mine[3]]
        )
        combined, combined_w, event = buffer.combine(recv_x, handle, topk_weights=recv_w)
        want_out = reference.combine(
            [w[0] for w in want], [w[4] for w in want], [N] * info.nranks, topk_weights=[w[2] for w in want]
        )
        out["combine"] = np.array_equal(combined.float().cpu().numpy(), want_out[info.rank][0]) and np.array_equal(
            combined_w.cpu().numpy(), want_out[info.rank][1]
        )
        again = buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=weights)
        out["cached_zero_copy_outputs"] = torch.equal(again[0], recv_x) and again[0].data_ptr() != recv_x.data_ptr()
        # Weights that require grad, as Megatron-Core's router probabilities inside its autograd Function (PyTorch
        # exports no such tensor: the adapter detaches), in a dispatch and in the combine.
        probs = weights.clone().requires_grad_()
        graded = buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=probs)
        combined_graded = buffer.combine(graded[0], handle, topk_weights=graded[2].clone().requires_grad_())
        out["weights_requiring_grad"] = (
            torch.equal(graded[2], recv_w)
            and torch.equal(combined_graded[0], combined)
            and torch.equal(combined_graded[1], combined_w)
            or "the results differ"
        )

        # Outputs come from PyTorch's allocator (as DeepEP's do), so that Tensor.record_stream works on them: it does
        # nothing for memory PyTorch did not allocate. One request per output and none more (torch_allocations); a
        # dispatch also makes recv_src_idx, which pydeepep writes and the adapter drops (DeepEP keeps it in its handle).
        verdicts = {
            "layout": torch_allocations(lambda: buffer.get_dispatch_layout(topk, E)[:4])[0],
            "dispatch": torch_allocations(
                lambda: buffer.dispatch(x, topk_idx=topk, topk_weights=weights, num_tokens_per_expert=per_expert)[:3],
                unreturned=1,
            )[0],
            "cached dispatch": torch_allocations(
                lambda: buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=weights)[:3], unreturned=1
            )[0],
            "combine": torch_allocations(lambda: buffer.combine(recv_x, handle, topk_weights=recv_w)[:2])[0],
        }
        out["outputs_from_torch_allocator"] = all(v is True for v in verdicts.values()) or "; ".join(
            f"{name}: {v}" for name, v in verdicts.items() if v is not True
        )

        # FP8 with column-major scales (DeepGEMM's layout), cached on the same routing: the rows and their scales
        # arrive as a row-major pair would.
        def fp8_rows(rank):  # e4m3 bits and float32 scales of a rank's tokens, told apart by rank
            bits = (np.arange(N * H) % 120 + rank).astype(np.uint8).reshape(N, H)
            return bits, np.arange(N * (H // 128), dtype=np.float32).reshape(N, H // 128) + 1000 * rank

        q_np, s_np = fp8_rows(info.rank)
        q = torch.from_numpy(q_np).cuda().view(torch.float8_e4m3fn)
        scales_cm = torch.from_numpy(s_np).cuda().t().contiguous().t()  # same values, column-major
        (recv_q, recv_s), *_ = buffer.dispatch((q, scales_cm), handle=handle, topk_idx=topk, topk_weights=weights)
        rows_of = [r * N + t for r, t in want[info.rank][4]]  # the received rows: (source rank, token) pairs
        all_q, all_s = (np.concatenate(parts) for parts in zip(*(fp8_rows(r) for r in range(info.nranks)), strict=True))
        out["fp8_column_major_scales"] = np.array_equal(
            recv_q.view(torch.uint8).cpu().numpy(), all_q[rows_of]
        ) and np.array_equal(recv_s.cpu().numpy(), all_s[rows_of])

        def step(name, check):
            """An added step: its verdict (True or a message), or its traceback, goes in out[name]."""
            try:
                out[name] = check()
            except Exception:
                out[name] = traceback.format_exc()

        scales_rm = torch.from_numpy(s_np).cuda()  # row-major, as fp8_rows makes them
        step(
            "inputs_read_in_place",
            lambda: in_place_case(
                buffer,
                handle,
                x,
                topk,
                weights,
                recv_x,
                recv_w,
                mine,
                want_out[info.rank],
                (q, scales_rm, all_q[rows_of], all_s[rows_of]),
            ),
        )

        def column_major_scales_after_a_late_event():
            # With async_finish, column-major scales that a side stream writes only after 0.2 s of sleep, passed with
            # that stream's event: they are copied on the communicator's stream after the event (the rows arrive with
            # the late values), and the current stream is not made to wait for the event meanwhile.
            torch.cuda.synchronize()
            late = torch.full_like(scales_cm, -1.0)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(400_000_000)  # GPU clock cycles
                late.copy_(scales_cm)
                produced = deep_ep.EventOverlap(deep_ep.EventHandle())
            if late.stride(0) != 1:
                return f"the scales are not column-major (strides {late.stride()})"
            (recv_q3, recv_s3), *_, done = buffer.dispatch(
                (q, late),
                handle=handle,
                topk_idx=topk,
                topk_weights=weights,
                previous_event=produced,
                async_finish=True,
            )
            mark = torch.cuda.current_stream().record_event()
            while not mark.query() and not produced.event.event.query():
                time.sleep(0.0005)
            current_stream_free_first = mark.query() and not produced.event.event.query()
            done.current_stream_wait()
            if not current_stream_free_first:
                return "the current stream waited for previous_event"
            if not np.array_equal(recv_s3.cpu().numpy(), all_s[rows_of]):
                return "the received scales are not the ones written before previous_event"
            return np.array_equal(recv_q3.view(torch.uint8).cpu().numpy(), all_q[rows_of]) or "the rows differ"

        step("fp8_column_major_scales_after_a_late_event", column_major_scales_after_a_late_event)

        # A chain on the communicator's stream: layout after an event of Buffer.capture(), dispatch after the layout's
        # event, combine after the dispatch's; the current stream waits once at the end.
        start = deep_ep.Buffer.capture()
        recorded = deep_ep.EventOverlap(deep_ep.EventHandle())  # as Megatron-Core writes it (deep_ep.utils there)
        recorded.current_stream_wait()
        per_rank2, _, per_expert2, in_rank2, layout_done = buffer.get_dispatch_layout(
            topk, E, previous_event=start, async_finish=True, allocate_on_comm_stream=True
        )
        recv_x2, _, recv_w2, _, handle2, dispatch_done = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank2,
            is_token_in_rank=in_rank2,
            num_tokens_per_expert=per_expert2,
            topk_idx=topk,
            topk_weights=weights,
            previous_event=layout_done,
            async_finish=True,
            allocate_on_comm_stream=True,
        )
        combined2, combined_w2, combine_done = buffer.combine(
            recv_x2, handle2, topk_weights=recv_w2, previous_event=dispatch_done, async_finish=True
        )
        with combine_done:
            pass
        out["previous_event_and_capture"] = (
            all(e.event is not None for e in (start, recorded, layout_done, dispatch_done, combine_done))
            and np.array_equal(per_expert2.cpu().numpy(), want_layout[1])
            and np.array_equal(recv_x2.float().cpu().numpy(), mine[0])
            and np.array_equal(combined2.float().cpu().numpy(), want_out[info.rank][0])
            and np.array_equal(combined_w2.cpu().numpy(), want_out[info.rank][1])
        )

        me, nranks = info.rank, info.nranks
        step(
            "worst_case_dispatch_and_combine",
            lambda: worst_case_case(buffer, x, topk, weights, layout, mine, want_out[me], nranks),
        )
        step("combine_bias_pairs", lambda: bias_case(buffer, recv_x, recv_w, handle, want, me, nranks))
        step("expert_alignment", lambda: alignment_case(buffer, x, topk, weights, layout, everyone, mine, me))
        step("deterministic_repeats", lambda: repeat_case(buffer, x, topk, weights, layout, mine, want_out[me]))
        step(
            "adapter_refuses_on_one_rank",
            lambda: ht_refusal_case(buffer, x, topk, weights, per_expert, handle, recv_x, me, nranks),
        )

        # A torch CUDA graph of a cached dispatch (the handle above) and a combine, replayed with new data copied into
        # the captured input: its outputs come from the graph's pool and match the same calls made eagerly, and the
        # oracle's scaled by the power of two the data were (exact in BF16, whose rounding commutes with it).
        static_x = x.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_recv, _, g_w, _, _, _ = buffer.dispatch(static_x, handle=handle, topk_idx=topk, topk_weights=weights)
            g_out, g_out_w, _ = buffer.combine(g_recv, handle, topk_weights=g_w)
        replays = []
        for scale in (2.0, -0.5):
            new_x = (x.float() * scale).to(torch.bfloat16)
            static_x.copy_(new_x)
            graph.replay()
            eager_recv = buffer.dispatch(new_x, handle=handle, topk_idx=topk, topk_weights=weights)
            eager_out = buffer.combine(eager_recv[0], handle, topk_weights=eager_recv[2])
            torch.cuda.synchronize()
            replays.append(
                torch.equal(g_recv, eager_recv[0])
                and torch.equal(g_out, eager_out[0])
                and torch.equal(g_out_w, eager_out[1])
                and matches(g_recv, mine[0] * np.float32(scale))
                and matches(g_out, want_out[me][0] * np.float32(scale) + np.float32(0))  # sums start from +0.0
                and matches(g_out_w, want_out[me][1])
            )
        out["cached_calls_in_a_torch_graph"] = all(replays) or f"replays equal to the eager calls: {replays}"
        buffer.destroy()
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    return out


def spawn_with_process_group(target):
    """Runs `target(info, init_file)` on RANKS ranks, which meet in torch.distributed through a fresh init file."""
    init_file = os.path.join(tempfile.mkdtemp(), "pg")
    return spawn_ranks(target, nprocs=RANKS, args=(init_file,), timeout=150 * RANKS)


@pytest.fixture(scope="module")
def results():
    return spawn_with_process_group(adapter_rank)


def stream_outlives_rank(info, init_file):
    """Frees the inputs an async_finish dispatch recorded on the communicator's stream (Tensor.record_stream) after
    the Buffer, its handle, the outputs and every other reference to the communicator are gone: PyTorch's allocator
    then records an event on that stream, which must still exist (a destroyed one crashed the rank with -11)."""
    import gc

    import torch.distributed as dist

    import pydeepep.torch as deep_ep

    torch.cuda.set_device(info.device)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=info.rank, world_size=info.nranks)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, int(256e6), 0)
        x, topk, weights = torch_inputs(info.rank)
        layout = buffer.get_dispatch_layout(topk, E)
        recv_x, _, recv_w, _, handle, event = dispatch_with_layout(buffer, x, topk, weights, layout, async_finish=True)
        event.current_stream_wait()
        comm_stream = buffer.comm.stream
        buffer.destroy()
        del buffer, handle, event, recv_x, recv_w, layout
        gc.collect()
        del x, topk, weights  # recorded on the communicator's stream, which nothing here holds any more
        torch.cuda.synchronize()
        # A use-after-destroy need not crash: ask the driver whether the stream still exists (idle, so CUDA_SUCCESS).
        from cuda.bindings import driver

        (status,) = driver.cuStreamQuery(driver.CUstream(comm_stream))
        return True if status == driver.CUresult.CUDA_SUCCESS else f"the communicator's stream: {status!r}"
    finally:
        dist.destroy_process_group()


def test_tensors_recorded_on_the_communicators_stream_may_be_freed_after_the_buffer():
    assert spawn_with_process_group(stream_outlives_rank) == [True] * RANKS


@pytest.mark.parametrize(
    "step",
    [
        "layout",
        "dispatch",
        "async_keeps_inputs",
        "combine",
        "cached_zero_copy_outputs",
        "weights_requiring_grad",
        "outputs_from_torch_allocator",
        "fp8_column_major_scales",
        "inputs_read_in_place",
        "fp8_column_major_scales_after_a_late_event",
        "previous_event_and_capture",
        "worst_case_dispatch_and_combine",
        "combine_bias_pairs",
        "expert_alignment",
        "deterministic_repeats",
        "adapter_refuses_on_one_rank",
        "cached_calls_in_a_torch_graph",
    ],
)
def test_deepep_style_code_runs_unchanged(results, step):
    got = [r.get(step, r.get("error")) for r in results]
    assert all_true(got), "\n".join(f"rank {rank}: {value}" for rank, value in enumerate(got))


# ---- low-latency mode ------------------------------------------------------------------------------------------------

T_LL, H_LL, K_LL, E_LL, N_LL = 128, 1024, 8, 16, 100  # num_max_dispatch_tokens_per_rank, hidden, top-k, experts, tokens


def ll_inputs(seed, rank):
    """x [N, H] of BF16 values (rows of very different magnitudes), topk [N, K] (distinct experts, some -1), weights."""
    rng = np.random.default_rng([seed, rank])
    magnitude = 10.0 ** rng.uniform(-2, 2, size=(N_LL, 1))
    x = reference.bf16_round((rng.standard_normal((N_LL, H_LL)) * magnitude).astype(np.float32))
    topk = np.argsort(rng.random((N_LL, E_LL)), axis=1)[:, :K_LL].astype(np.int64)
    topk[rng.random(topk.shape) < 0.1] = -1
    return x, topk, rng.random((N_LL, K_LL)).astype(np.float32)


def ll_expert_outputs(seed, nranks):
    """Every rank's expert outputs [E_loc, R*T, H] (BF16 values) for a combine."""
    shape = (E_LL // nranks, nranks * T_LL, H_LL)
    return [
        reference.bf16_round(np.random.default_rng([seed, 99, r]).standard_normal(shape).astype(np.float32))
        for r in range(nranks)
    ]


def bf16_cuda(values):
    return torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16).cuda()


def ll_cuda(inputs):
    x, topk, weights = inputs
    return bf16_cuda(x), torch.from_numpy(topk).cuda(), torch.from_numpy(weights).cuda()


def check_ll_dispatch(recv_x, recv_count, want, nranks, use_fp8=True, ue8m0=False):
    """True, or the first way the adapter's dispatch outputs differ from the oracle's (in their DeepEP form: FP8
    payload and column-major scales, or BF16). Rows past each count are not compared (left as they were)."""
    exp_x, exp_scales, exp_count, _ = want
    local, rows = E_LL // nranks, nranks * T_LL
    if recv_count.dtype != torch.int32 or tuple(recv_count.shape) != (local,):
        return f"recv_count is {recv_count.dtype} {tuple(recv_count.shape)}"
    counts = recv_count.cpu().numpy()
    if not np.array_equal(counts, exp_count):
        return f"recv_count {counts.tolist()} != {exp_count.tolist()}"
    if use_fp8:
        if not isinstance(recv_x, tuple) or len(recv_x) != 2:
            return "FP8 recv_x is not a (payload, scales) pair"
        payload, scales = recv_x
        if payload.dtype != torch.float8_e4m3fn or tuple(payload.shape) != (local, rows, H_LL):
            return f"payload is {payload.dtype} {tuple(payload.shape)}"
        columns, scales_dtype = ((H_LL // 128 + 3) // 4, torch.int32) if ue8m0 else (H_LL // 128, torch.float32)
        if scales.dtype != scales_dtype or tuple(scales.shape) != (local, rows, columns):
            return f"scales are {scales.dtype} {tuple(scales.shape)}"
        if scales.stride()[1] != 1:
            return f"scales have strides {scales.stride()}; DeepEP's are column-major (stride 1 along tokens)"
        got = e4m3_values(payload.view(torch.uint8).cpu().numpy())
        got_scales = scales.cpu().numpy()
    else:
        if recv_x.dtype != torch.bfloat16 or tuple(recv_x.shape) != (local, rows, H_LL):
            return f"recv_x is {recv_x.dtype} {tuple(recv_x.shape)}"
        got, got_scales = recv_x.float().cpu().numpy(), None
    for le, m in enumerate(counts):
        if not np.array_equal(got[le, :m], exp_x[le, :m]):
            return f"payload of local expert {le} differs"
        if use_fp8:
            want_scales = reference.ue8m0_pack(exp_scales[le, :m]) if ue8m0 else exp_scales[le, :m]
            if not np.array_equal(got_scales[le, :m], want_scales):
                return f"scales of local expert {le} differ"
    return True


def ll_step(
    buffer, me, nranks, seed, use_fp8=True, ue8m0=False, hook=False, async_finish=False, zero_copy=False, out=False
):
    """One DeepEP-style decode step (dispatch, expert outputs, combine) through the adapter against the oracle."""
    inputs = [ll_inputs(seed, r) for r in range(nranks)]
    topks, weights_all = [i[1] for i in inputs], [i[2] for i in inputs]
    want = reference.low_latency_dispatch([i[0] for i in inputs], topks, E_LL, T_LL, use_fp8=use_fp8, round_scale=ue8m0)
    x, topk, weights = ll_cuda(inputs[me])
    recv_x, recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
        x,
        topk,
        T_LL,
        E_LL,
        use_fp8=use_fp8,
        round_scale=ue8m0,
        use_ue8m0=ue8m0,
        async_finish=async_finish,
        return_recv_hook=hook,
    )
    if hook:
        if not callable(recv_hook):
            return "return_recv_hook gave no hook"
        recv_hook()
    elif recv_hook is not None:
        return "a hook without return_recv_hook"
    if async_finish:
        if event.event is None:
            return "async_finish gave no event"
        event.current_stream_wait()
    elif event.event is not None:
        return "an event without async_finish"
    verdict = check_ll_dispatch(recv_x, recv_count, want[me], nranks, use_fp8, ue8m0)
    if verdict is not True:
        return verdict
    payload = recv_x[0] if use_fp8 else recv_x
    if payload.data_ptr() != handle.recv_x.ptr or (use_fp8 and recv_x[1].data_ptr() != handle.recv_scales.ptr):
        return "the dispatch outputs are copies of pydeepep's arrays"

    ys = ll_expert_outputs(seed, nranks)
    want_out = reference.low_latency_combine(ys, topks, weights_all, [w[3] for w in want])[me]
    y = bf16_cuda(ys[me])
    if zero_copy:
        buffer_view = buffer.get_next_low_latency_combine_buffer(handle)
        if buffer_view.dtype != torch.bfloat16 or buffer_view.shape != y.shape:
            return f"the combine buffer is {buffer_view.dtype} {tuple(buffer_view.shape)}"
        buffer_view.copy_(y)
        y = buffer_view  # DeepEP code passes the buffer itself as x
    target = torch.empty((N_LL, H_LL), dtype=torch.bfloat16, device="cuda") if out else None
    combined, event, recv_hook = buffer.low_latency_combine(
        y, topk, weights, handle, zero_copy=zero_copy, async_finish=async_finish, return_recv_hook=hook, out=target
    )
    if hook:
        if not callable(recv_hook):
            return "return_recv_hook gave no combine hook"
        recv_hook()
    if async_finish:
        if event.event is None:
            return "async_finish gave no combine event"
        with event:  # the exit makes the current stream wait
            pass
    if out and combined.data_ptr() != target.data_ptr():
        return "combine did not return out="
    if combined.dtype != torch.bfloat16 or tuple(combined.shape) != (N_LL, H_LL):
        return f"combined_x is {combined.dtype} {tuple(combined.shape)}"
    if not np.array_equal(combined.float().cpu().numpy(), want_out):
        return "combine output differs"
    return True


def ll_stats_case(buffer, me, nranks, seed):
    """cumulative_local_expert_recv_stats (int32) gains each dispatch's counts, also through a receive hook;
    dispatch_wait_recv_cost_stats and combine_wait_recv_cost_stats (int64) only grow."""
    local = E_LL // nranks
    counts = torch.full((local,), 5, dtype=torch.int32, device="cuda")
    waits = torch.zeros((nranks,), dtype=torch.int64, device="cuda")
    total = np.full(local, 5, np.int64)
    for i in range(2):
        inputs = [ll_inputs(seed + i, r) for r in range(nranks)]
        want = reference.low_latency_dispatch([a[0] for a in inputs], [a[1] for a in inputs], E_LL, T_LL)
        x, topk, weights = ll_cuda(inputs[me])
        _, recv_count, handle, _, recv_hook = buffer.low_latency_dispatch(
            x,
            topk,
            T_LL,
            E_LL,
            cumulative_local_expert_recv_stats=counts,
            dispatch_wait_recv_cost_stats=waits,
            return_recv_hook=i == 1,
        )
        if recv_hook is not None:
            recv_hook()
        if not np.array_equal(recv_count.cpu().numpy(), want[me][2]):
            return f"recv_count of dispatch {i} differs"
        total += want[me][2]
    if counts.dtype != torch.int32 or not np.array_equal(counts.cpu().numpy(), total):
        return f"cumulative_local_expert_recv_stats {counts.cpu().tolist()} != {total.tolist()}"
    # Passed through to the library, they grew from zero (each dispatch waits some time for every source).
    if np.any(waits.cpu().numpy() < 0) or waits.sum().item() == 0:
        return f"dispatch_wait_recv_cost_stats {waits.cpu().tolist()}"
    # The last rank starts its combine late, so that rank 0 waits for its rows a while.
    combine_waits = torch.zeros((nranks,), dtype=torch.int64, device="cuda")
    expert_out = torch.zeros((local, nranks * T_LL, H_LL), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    if me == nranks - 1:
        time.sleep(0.05)
    buffer.low_latency_combine(expert_out, topk, weights, handle, combine_wait_recv_cost_stats=combine_waits)
    got = combine_waits.cpu().numpy()
    if np.any(got < 0) or (me == 0 and nranks > 1 and got[nranks - 1] < 10_000_000):
        return f"combine_wait_recv_cost_stats {got.tolist()} ns (the last rank started 50 ms late)"
    return True


def ll_sizes_case(buffer, me, nranks, seed):
    """clean_low_latency_buffer on an existing area does nothing; larger sizes and LogFMT are refused (local checks,
    before any communication)."""
    buffer.clean_low_latency_buffer(T_LL, H_LL, E_LL)
    x, topk, weights = ll_cuda(ll_inputs(seed, me))
    refusals = [
        (lambda: buffer.low_latency_dispatch(torch.cat([x, x], dim=1), topk, T_LL, E_LL), "hidden"),
        (lambda: buffer.clean_low_latency_buffer(2 * T_LL, H_LL, E_LL), "num_max_dispatch_tokens_per_rank"),
        (lambda: buffer.low_latency_dispatch(x, topk, T_LL, 2 * E_LL), "num_experts"),
        (lambda: buffer.low_latency_combine(x, topk, weights, None, use_logfmt=True), "use_logfmt"),
    ]
    for call, field in refusals:
        try:
            call()
            return f"a call naming {field} was accepted"
        except (pydeepep.DeepEPInvalidArgument, pydeepep.DeepEPNotSupported) as exc:
            if field not in str(exc):
                return str(exc)
    return True


def ll_buffer_ht_case(buffer, me, nranks):
    """High-throughput calls on the low_latency_mode Buffer made without NVLink bytes (as DeepEP decode code makes
    it): the layout works; a dispatch that needs more than the small high-throughput part is refused before any
    communication with an error naming the buffer size (on the GPU the message ended "... in the config)")."""
    everyone = [inputs(r) for r in range(nranks)]
    topk_np = everyone[me][1]
    x, topk, weights = torch_inputs(me)
    layout = buffer.get_dispatch_layout(topk, E)
    want_layout = reference.dispatch_layout(topk_np, E, nranks)
    if not np.array_equal(layout[0].cpu().numpy(), want_layout[0]):
        return "HT layout differs"
    try:
        dispatch_with_layout(buffer, x, topk, weights, layout)
    except pydeepep.DeepEPBufferTooSmall as exc:
        return True if "buffer" in str(exc) else str(exc)
    return "a dispatch larger than the Buffer's high-throughput part was accepted"


def ll_graph_case(buffer, me, nranks, seed):
    """BF16 dispatch, and the combine of the dispatched rows, captured in a torch CUDA graph after a warm-up call,
    then replayed with new data and routing copied into the captured input tensors."""
    x, topk, weights = ll_cuda(ll_inputs(seed, me))
    warm = buffer.low_latency_dispatch(x, topk, T_LL, E_LL, use_fp8=False)
    warm_out = buffer.low_latency_combine(warm[0], topk, weights, warm[2])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk, T_LL, E_LL, use_fp8=False)
        combined, _, _ = buffer.low_latency_combine(recv_x, topk, weights, handle)
    verdicts = []
    for trial in range(3):
        inputs = [ll_inputs(seed + 1 + trial, r) for r in range(nranks)]
        for captured, new in zip((x, topk, weights), ll_cuda(inputs[me]), strict=True):
            captured.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        topks = [i[1] for i in inputs]
        want = reference.low_latency_dispatch([i[0] for i in inputs], topks, E_LL, T_LL, use_fp8=False)
        dispatched = check_ll_dispatch(recv_x, recv_count, want[me], nranks, use_fp8=False)
        want_out = reference.low_latency_combine(
            [w[0] for w in want], topks, [i[2] for i in inputs], [w[3] for w in want]
        )[me]
        verdicts.append((dispatched, np.array_equal(combined.float().cpu().numpy(), want_out)))
    del warm, warm_out  # kept alive until after the capture: nothing of theirs is freed while capturing
    return all(d is True and c for d, c in verdicts) or f"replays (dispatch, combine): {verdicts}"


def ll_refusal_case(buffer, me, nranks, seed):
    """A low-latency call the adapter itself refuses on the last rank (its own checks, before pydeepep has the call:
    a hook with async_finish, more tokens than num_max_dispatch_tokens_per_rank, more experts than the area holds,
    use_logfmt, an output of the wrong dtype, also after async_finish moved the call to the communicator's stream)
    ends at once everywhere: that rank raises its error, the others DeepEPRemoteError naming it (not the timeout);
    so does a combine of a refused dispatch's result (also with zero_copy), and the ranks stay in step: a decode step
    afterwards matches the oracle."""
    refuser = nranks - 1
    bad = me == refuser
    x, topk, weights = ll_cuda(ll_inputs(seed, me))
    rows = torch.zeros((E_LL // nranks, nranks * T_LL, H_LL), dtype=torch.bfloat16, device="cuda")

    def combine(**refused_options):
        _, _, handle, _, _ = buffer.low_latency_dispatch(x, topk, T_LL, E_LL, use_fp8=False)  # accepted everywhere
        buffer.low_latency_combine(rows, topk, weights, handle, **(refused_options if bad else {}))

    def combine_of_refused_dispatch(zero_copy=False):
        try:
            handle = buffer.low_latency_dispatch(x, topk, T_LL, E_LL, async_finish=bad, return_recv_hook=bad)[2]
        except pydeepep.DeepEPInvalidArgument as exc:
            handle = exc.refused_result
        buffer.low_latency_combine(rows, topk, weights, handle, zero_copy=zero_copy and bad)

    float_out = torch.empty((x.shape[0], H_LL), dtype=torch.float32, device="cuda")

    invalid = pydeepep.DeepEPInvalidArgument
    calls = {  # what -> (the call, what the refusing rank raises)
        "dispatch with async_finish and a receive hook": (
            lambda: buffer.low_latency_dispatch(x, topk, T_LL, E_LL, async_finish=bad, return_recv_hook=bad),
            invalid,
        ),
        "dispatch of more tokens than num_max_dispatch_tokens_per_rank": (
            lambda: buffer.low_latency_dispatch(x, topk, N_LL - 1 if bad else T_LL, E_LL),
            invalid,
        ),
        "dispatch of more experts than the area holds": (
            lambda: buffer.low_latency_dispatch(x, topk, T_LL, 2 * E_LL if bad else E_LL),
            invalid,
        ),
        "combine with use_logfmt": (lambda: combine(use_logfmt=True), pydeepep.DeepEPNotSupported),
        "combine into a float32 out": (lambda: combine(out=float_out), invalid),
        "combine with async_finish into a float32 out": (lambda: combine(async_finish=True, out=float_out), invalid),
        "combine with async_finish and a receive hook": (
            lambda: combine(async_finish=True, return_recv_hook=True),
            invalid,
        ),
        "combine of a refused dispatch's result": (combine_of_refused_dispatch, pydeepep.DeepEPInvalidUsage),
        "zero-copy combine of a refused dispatch's result": (
            lambda: combine_of_refused_dispatch(zero_copy=True),
            pydeepep.DeepEPInvalidUsage,
        ),
    }
    failures = one_rank_refusal_failures(buffer.comm, calls, refuser, torch.cuda.synchronize)
    if failures:
        return "; ".join(failures)
    verdict = ll_step(buffer, me, nranks, seed + 1)
    return True if verdict is True else f"after the refusals: {verdict}"


def ll_mask_case(buffer, me, nranks, seed):
    """DeepEP's mask buffer calls (its enable_shrink surface): every rank but the last masks the last, which masks
    every other (with 2 ranks each masks the other); the query shows it; a dispatch and combine then run in the two
    groups as if the ranks outside a group had no tokens and every slot naming their experts were -1; the mask cleaned
    (and the ranks met), they work together again."""
    import torch.distributed as dist

    outcast, local = nranks - 1, E_LL // nranks
    group = [me] if me == outcast else [r for r in range(nranks) if r != outcast]  # the ranks this one works with
    inputs = [ll_inputs(seed, r) for r in range(nranks)]
    nothing = (np.zeros((0, H_LL), np.float32), np.zeros((0, K_LL), np.int64), np.zeros((0, K_LL), np.float32))
    # Each rank's tokens as this rank's group sees them.
    seen = [
        (x, np.where(np.isin(topk // local, group), topk, -1), w) if r in group else nothing
        for r, (x, topk, w) in enumerate(inputs)
    ]
    status = torch.full((nranks,), 7, dtype=torch.int32, device="cuda")
    buffer.low_latency_query_mask_buffer(status)
    if status.tolist() != [0] * nranks:
        return f"mask_status {status.tolist()} before any rank was masked"
    for r in range(nranks):
        if r not in group:
            buffer.low_latency_update_mask_buffer(r, True)
    try:
        buffer.low_latency_update_mask_buffer(me)  # this rank: never masked, nothing to take back
        try:
            buffer.low_latency_update_mask_buffer(me, True)
            return "this rank masked itself"
        except pydeepep.DeepEPInvalidArgument as exc:
            if "cannot mask itself" not in str(exc):
                return str(exc)
        buffer.low_latency_query_mask_buffer(status)
        if status.tolist() != [int(r not in group) for r in range(nranks)]:
            return f"mask_status {status.tolist()} with the ranks outside {group} masked"
        want = reference.low_latency_dispatch([s[0] for s in seen], [s[1] for s in seen], E_LL, T_LL)
        x, topk, weights = ll_cuda(inputs[me])  # the real routing: the library skips the masked ranks' experts
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, topk, T_LL, E_LL)
        verdict = check_ll_dispatch(recv_x, recv_count, want[me], nranks)
        if verdict is not True:
            return f"masked: {verdict}"
        ys = ll_expert_outputs(seed, nranks)
        want_out = reference.low_latency_combine(ys, [s[1] for s in seen], [s[2] for s in seen], [w[3] for w in want])
        combined, _, _ = buffer.low_latency_combine(bf16_cuda(ys[me]), topk, weights, handle)
        if not np.array_equal(combined.float().cpu().numpy(), want_out[me]):
            return "masked: combine output differs"
    finally:
        buffer.low_latency_clean_mask_buffer()
        dist.barrier()  # taking a rank back needs every rank idle and unmasked before the next call
    buffer.low_latency_query_mask_buffer(status)
    if status.tolist() != [0] * nranks:
        return f"mask_status {status.tolist()} after clean_mask_buffer"
    verdict = ll_step(buffer, me, nranks, seed + 1)
    return True if verdict is True else f"after the mask was cleaned: {verdict}"


LL_STEPS = {
    # The first call creates the communicator, sized from it (T, H, K, E).
    "ll_fp8": lambda b, me, r: ll_step(b, me, r, 1),
    "ll_statistics": lambda b, me, r: ll_stats_case(b, me, r, 10),
    "ll_fp8_ue8m0": lambda b, me, r: ll_step(b, me, r, 2, ue8m0=True),
    "ll_recv_hook": lambda b, me, r: ll_step(b, me, r, 3, hook=True),
    "ll_async_finish": lambda b, me, r: ll_step(b, me, r, 4, async_finish=True),
    "ll_bf16": lambda b, me, r: ll_step(b, me, r, 5, use_fp8=False),
    "ll_zero_copy": lambda b, me, r: ll_step(b, me, r, 6, zero_copy=True),
    "ll_combine_out": lambda b, me, r: ll_step(b, me, r, 7, out=True),
    "ll_sizes": lambda b, me, r: ll_sizes_case(b, me, r, 8),
    "ll_buffer_runs_ht": lambda b, me, r: ll_buffer_ht_case(b, me, r),
    "ll_adapter_refuses_on_one_rank": lambda b, me, r: ll_refusal_case(b, me, r, 30),
    "ll_mask_buffer": lambda b, me, r: ll_mask_case(b, me, r, 40),
    "ll_cuda_graph": lambda b, me, r: ll_graph_case(b, me, r, 20),  # last: replays leave the buffer sets as captured
}


def ll_adapter_rank(info, init_file):
    import torch.distributed as dist

    import pydeepep.torch as deep_ep

    out = {}
    torch.cuda.set_device(info.device)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=info.rank, world_size=info.nranks)
    try:
        rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(T_LL, H_LL, info.nranks, E_LL)
        buffer = deep_ep.Buffer(
            dist.group.WORLD, 0, rdma_bytes, low_latency_mode=True, num_qps_per_rank=E_LL // info.nranks
        )
        out["lazy_creation"] = buffer.comm is None
        for name, step in LL_STEPS.items():
            try:
                out[name] = step(buffer, info.rank, info.nranks)
            except Exception:
                out[name] = traceback.format_exc()
            if isinstance(out[name], str) and "Timeout" in out[name]:
                break  # the ranks are out of step: later steps would only time out too
        out["lazy_creation"] = out["lazy_creation"] and buffer._ll_sizes == (T_LL, H_LL, K_LL, E_LL)
        buffer.destroy()
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def ll_results():
    return spawn_with_process_group(ll_adapter_rank)


@pytest.mark.parametrize("step", ["lazy_creation", *LL_STEPS])
def test_deepep_style_low_latency_code_runs_unchanged(ll_results, step):
    got = [r.get(step, r.get("error", "not run")) for r in ll_results]
    # The message carries every rank's whole traceback (an assertion's own diff would cut it short).
    assert all_true(got), "\n".join(f"rank {rank}: {value}" for rank, value in enumerate(got))
