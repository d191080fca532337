"""GPU tier: low-latency dispatch and combine on RANKS ranks (conftest: 2 unless DEEPEP_TEST_RANKS says otherwise)
against the NumPy oracle, bit for bit (one rank: test_gpu_one_rank.py runs one_rank_ll).

Every rank builds every rank's inputs from the same seeds (the oracle needs them all), runs its part on the GPU and
compares its own outputs: FP8 payloads and scales (float32, power-of-two, UE8M0-packed), BF16 payloads, counts,
source information and combine outputs. All scenarios run in one job; each test asserts on its scenario.
"""

import re
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
    e4m3_values,
    exact_equal,
    gpu_tier_cupy,
    log_scenario,
    one_rank_refusal_failures,
    requires_ranks,
    spawn_ranks,
)

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(RANKS)]
cupy = gpu_tier_cupy()

T = 128  # low_latency_max_tokens of the test communicators
SLOT_SHIFT = 16  # recv_src_info = token | slot << 16


def make_inputs(
    seed, rank, n, h, k, e, nranks, drop=0.1, to_rank=None, index_dtype=np.int64, any_bits=False, repeats=False
):
    """BF16 bits [n, h] (rows of very different magnitudes, row 0 all zeros; with `any_bits`, every finite BF16 bit
    pattern equally likely: zeros, subnormals and tiny channels next to huge ones), topk [n, k], weights [n, k]. With
    `repeats`, about half the tokens name their first slot's expert again in their last slot, and a quarter their
    second slot's in their fourth (a -1 slot repeated stays -1)."""
    rng = np.random.default_rng([seed, rank])
    if to_rank is not None:  # every token's experts live on one rank: several experts of a token on that rank
        local = e // nranks
        topk = np.stack([to_rank * local + rng.choice(local, size=k, replace=False) for _ in range(n)])
        topk = topk.reshape(n, k).astype(np.int64)
    elif n:
        topk = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64)
    else:
        topk = np.zeros((0, k), np.int64)
    topk[rng.random(topk.shape) < drop] = -1
    if repeats and n and k > 1:
        again = rng.random(n) < 0.5
        topk[again, k - 1] = topk[again, 0]
        if k > 3:
            again = rng.random(n) < 0.25
            topk[again, 3] = topk[again, 1]
    magnitude = 10.0 ** rng.uniform(-3, 3, size=(n, 1))
    x = (rng.standard_normal((n, h)) * magnitude).astype(np.float32)
    if n:
        x[0] = 0.0  # amax floored at 1e-4
    weights = rng.random((n, k)).astype(np.float32)
    if any_bits:  # exponent field below 0xff: no inf or NaN
        bits = rng.integers(0, 0x7F80, size=(n, h), dtype=np.uint16) | (rng.integers(0, 2, size=(n, h)) << 15)
        return bits.astype(np.uint16), topk.astype(index_dtype), weights
    return bf16_bits(x), topk.astype(index_dtype), weights


def dev(a):
    return cupy.asarray(a)


def strided_rows(x_bits, layout):
    """BF16 bits [n, h] on the device with rows further apart than h, other BF16 data (1024.0) between them:
    "rows", every other row of a [2n, h] array; "columns", the first h columns of an [n, h + 64] array."""
    n, h = x_bits.shape
    if layout == "rows":
        base = cupy.full((2 * n, h), 0x4480, cupy.uint16)
        view = base[::2]
    else:
        base = cupy.full((n, h + 64), 0x4480, cupy.uint16)
        view = base[:, :h]
    view[...] = dev(x_bits)
    return view


def check_dispatch(result, want, inputs, me, e, nranks, use_fp8, ue8m0, token_contiguous=False):
    """Compares one rank's dispatch outputs with the oracle's; True or a description of the first mismatch."""
    exp_x, exp_scales, exp_count, exp_src = want
    local = e // nranks
    counts = result.recv_count.to_numpy()
    if not np.array_equal(counts, exp_count):
        return f"recv_count {counts.tolist()} != {exp_count.tolist()}"
    got_x = result.recv_x.to_numpy()
    info = result.recv_src_info.to_numpy()
    ranges = result.recv_layout_range.to_numpy()
    got_scales = result.recv_scales.to_numpy() if use_fp8 else None
    if token_contiguous:  # stored [E_loc, columns, R*T]
        got_scales = got_scales.transpose(0, 2, 1)
    for le in range(local):
        m = int(counts[le])
        starts, sizes = ranges[le, :, 0], ranges[le, :, 1]
        if int(sizes.sum()) != m or not np.array_equal(starts, np.concatenate([[0], np.cumsum(sizes)[:-1]])):
            return f"recv_layout_range of local expert {le} is {ranges[le].tolist()} for {m} rows"
        src_rank = np.repeat(np.arange(nranks), sizes)
        if not np.array_equal(src_rank, exp_src[le, :m, 0]):
            return f"source ranks of local expert {le} differ"
        token = info[le, :m] & ((1 << SLOT_SHIFT) - 1)
        slot = info[le, :m] >> SLOT_SHIFT
        if not np.array_equal(token, exp_src[le, :m, 1]):
            return f"source tokens of local expert {le} differ"
        if np.any(info[le, m:] != -1):
            return f"recv_src_info of local expert {le} is not -1 past the count"
        expert = me * local + le
        for row in range(m):  # the slot is the first one of the token naming the expert
            topk = np.asarray(inputs[src_rank[row]][1], dtype=np.int64)
            if topk[token[row], slot[row]] != expert or np.any(topk[token[row], : slot[row]] == expert):
                return f"slot of row {row} of local expert {le} is {slot[row]}"
        # Values and their signs (exact_equal): the oracle keeps the sign of a value cast to zero, as the bits must.
        if use_fp8:
            if not exact_equal(e4m3_values(got_x[le, :m]), exp_x[le, :m]):
                return f"FP8 payload of local expert {le} differs"
            want_scales = reference.ue8m0_pack(exp_scales[le, :m]) if ue8m0 else exp_scales[le, :m]
            if not exact_equal(got_scales[le, :m], want_scales):
                return f"scales of local expert {le} differ"
        elif not exact_equal(bf16_values(got_x[le, :m]), exp_x[le, :m]):
            return f"BF16 payload of local expert {le} differs"
    return True


def run_case(
    comm,
    seed,
    n,
    h,
    k,
    e,
    use_fp8=True,
    round_scale=False,
    ue8m0=False,
    hook=False,
    zero_copy=False,
    drop=0.1,
    to_rank=None,
    index_dtype=np.int64,
    combine=True,
    reruns=0,
    token_contiguous=False,
    any_bits=False,
    repeats=False,
    strided_x=None,
):
    """Dispatch then combine one case; True or a description of the first mismatch. `strided_x` ("rows" or
    "columns", see strided_rows): x passed with rows further apart than hidden (x_row_stride)."""
    R, me = comm.nranks, comm.rank
    ns = [n(r) if callable(n) else n for r in range(R)]
    inputs = [make_inputs(seed, r, ns[r], h, k, e, R, drop, to_rank, index_dtype, any_bits, repeats) for r in range(R)]
    xs = [bf16_values(x) for x, _, _ in inputs]
    topks = [t.astype(np.int64) for _, t, _ in inputs]
    want = reference.low_latency_dispatch(xs, topks, e, T, use_fp8=use_fp8, round_scale=round_scale)
    x_mine, topk_mine, w_mine = inputs[me]
    with cupy.cuda.Device(comm.device):
        x_dev, topk_dev, w_dev = dev(x_mine), dev(topk_mine), dev(w_mine)
        if strided_x:
            x_dev = strided_rows(x_mine, strided_x)
            if len(x_mine) > 1 and x_dev.strides[0] <= h * x_dev.itemsize:
                return "the strided x is contiguous: the case tests nothing"
        result = comm.low_latency_dispatch(
            x_dev,
            topk_dev,
            e,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=ue8m0,
            return_recv_hook=hook,
            scales_token_contiguous=token_contiguous,
        )
        if hook:
            if result.hook is None:
                return "no hook returned"
            result.hook()
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        verdict = check_dispatch(result, want[me], inputs, me, e, R, use_fp8, ue8m0, token_contiguous)
        if verdict is not True or not combine:
            return verdict

        # Combine: fresh BF16 expert outputs in the dispatch layout on every rank.
        local = e // R
        ys_bits = [
            bf16_bits(np.random.default_rng([seed, 99, r]).standard_normal((local, R * T, h)).astype(np.float32))
            for r in range(R)
        ]
        want_out = reference.low_latency_combine(
            [bf16_values(y) for y in ys_bits], topks, [w for _, _, w in inputs], [w[3] for w in want]
        )[me]
        if zero_copy:
            buffer = cupy.asarray(comm.low_latency_combine_buffer(result).bits())
            if buffer.shape != (local, R * T, h):
                return f"combine buffer has shape {buffer.shape}"
            buffer[...] = dev(ys_bits[me])
            y_dev = None
        else:
            y_dev = dev(ys_bits[me])
        out, combine_hook = comm.low_latency_combine(
            y_dev, topk_dev, w_dev, result, zero_copy=zero_copy, return_recv_hook=hook
        )
        if hook:
            if combine_hook is None:
                return "no combine hook returned"
            combine_hook()
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        got = out.to_numpy()
        if not exact_equal(bf16_values(got), want_out):
            return "combine output differs"

        for _ in range(reruns):
            again = comm.low_latency_dispatch(
                x_dev, topk_dev, e, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=ue8m0
            )
            out2 = comm.low_latency_combine(dev(ys_bits[me]), topk_dev, w_dev, again).out
            cupy.cuda.runtime.deviceSynchronize()
            counts = result.recv_count.to_numpy()
            if not (
                np.array_equal(again.recv_count.to_numpy(), counts)
                and np.array_equal(again.recv_src_info.to_numpy(), result.recv_src_info.to_numpy())
                and np.array_equal(again.recv_layout_range.to_numpy(), result.recv_layout_range.to_numpy())
                and np.array_equal(out2.to_numpy(), got)
            ):
                return "a rerun differs"
            x1, x2 = result.recv_x.to_numpy(), again.recv_x.to_numpy()
            s1 = result.recv_scales.to_numpy() if use_fp8 else None
            s2 = again.recv_scales.to_numpy() if use_fp8 else None
            for le, m in enumerate(counts):
                if not np.array_equal(x1[le, :m], x2[le, :m]) or (use_fp8 and not exact_equal(s1[le, :m], s2[le, :m])):
                    return "a rerun's payload differs"
        comm.check_async_error()
    return True


def alternating_case(comm, seed, steps=12, h=256, k=4, e=16):
    """Many steps with new routing each step: the two buffer sets alternate; every step matches the oracle."""
    for step in range(steps):
        verdict = run_case(comm, seed + step, n=lambda r, s=step: (37 * (s + r)) % (T + 1), h=h, k=k, e=e, drop=0.2)
        if verdict is not True:
            return f"step {step}: {verdict}"
    return True


def double_hook_case(comm, seed, h=512, k=4, e=16):
    """Two dispatches sent before either receives (one per buffer set), received and combined in order."""
    R, me = comm.nranks, comm.rank
    cases = []
    with cupy.cuda.Device(comm.device):
        for i in range(2):
            inputs = [make_inputs(seed + i, r, 64 + 10 * i, h, k, e, R) for r in range(R)]
            want = reference.low_latency_dispatch(
                [bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], e, T
            )
            x, topk, w = (dev(a) for a in inputs[me])
            result = comm.low_latency_dispatch(x, topk, e, return_recv_hook=True)
            cases.append((inputs, want, x, topk, w, result))
        if {c[5].buffer_set for c in cases} != {0, 1}:
            return "two consecutive dispatches did not use both buffer sets"
        for *_, result in cases:
            result.hook()
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        for inputs, want, _x, topk, w, result in cases:
            verdict = check_dispatch(result, want[me], inputs, me, e, R, True, False)
            if verdict is not True:
                return verdict
            local = e // R
            ys = [
                bf16_bits(np.random.default_rng([seed, 7, r]).standard_normal((local, R * T, h)).astype(np.float32))
                for r in range(R)
            ]
            want_out = reference.low_latency_combine(
                [bf16_values(y) for y in ys],
                [t for _, t, _ in inputs],
                [w_ for _, _, w_ in inputs],
                [a[3] for a in want],
            )[me]
            out = comm.low_latency_combine(dev(ys[me]), topk, w, result).out
            if not exact_equal(bf16_values(out.to_numpy()), want_out):
                return "combine after a double hook differs"
    comm.check_async_error()
    return True


def graph_case(comm, seed, n=96, h=1024, k=6, e=16, use_fp8=False, round_scale=False, ue8m0=False, hook=False):
    """Dispatch + experts + combine captured in a CUDA graph, replayed with new data and routing, each replay checked
    against the oracle bit for bit. BF16: identity experts (a device copy of recv_x into the expert outputs, inside the
    graph). FP8 (cast in the kernel; float32, power-of-two or UE8M0-packed scales): the graph has no FP8 experts, so
    new expert outputs are written before each replay, outside it. `hook`: dispatch and combine are captured with
    return_recv_hook=True, each hook called inside the same capture (the receive kernels are part of the graph)."""
    from pydeepep.bench import CapturedGraph

    R, me = comm.nranks, comm.rank
    local = e // R
    cast = dict(use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=ue8m0)
    with cupy.cuda.Device(comm.device):
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x0, topk0, w0 = make_inputs(seed, me, n, h, k, e, R)
            x_dev, topk_dev, w_dev = dev(x0), dev(topk0), dev(w0)
            y_dev = cupy.zeros((local, R * T, h), cupy.uint16)
            first = comm.low_latency_dispatch(x_dev, topk_dev, e, stream=stream, **cast)
            first_out = comm.low_latency_combine(y_dev, topk_dev, w_dev, first, stream=stream).out
            stream.synchronize()
            hooks = []

            def step():
                d = comm.low_latency_dispatch(
                    x_dev, topk_dev, e, stream=stream, out=first, return_recv_hook=hook, **cast
                )
                if hook:
                    hooks.append(d.hook)
                    d.hook()
                if not use_fp8:  # identity experts
                    cupy.cuda.runtime.memcpyAsync(y_dev.data.ptr, d.recv_x.ptr, d.recv_x.nbytes, 3, stream.ptr)
                c = comm.low_latency_combine(
                    y_dev, topk_dev, w_dev, d, stream=stream, out=first_out, return_recv_hook=hook
                )
                if hook:
                    hooks.append(c.hook)
                    c.hook()

            graph = CapturedGraph(step, stream.ptr)
            verdicts = []
            for trial in range(3):
                inputs = [make_inputs(seed + 1 + trial, r, n, h, k, e, R) for r in range(R)]
                x_dev[...] = dev(inputs[me][0])
                topk_dev[...] = dev(inputs[me][1])
                w_dev[...] = dev(inputs[me][2])
                if use_fp8:  # every rank's expert outputs: the oracle's combine reads them all
                    ys = [
                        bf16_bits(np.random.default_rng([seed, trial, 7, r]).standard_normal((local, R * T, h)))
                        for r in range(R)
                    ]
                    y_dev[...] = dev(ys[me])
                graph.launch()
                stream.synchronize()
                xs = [bf16_values(x) for x, _, _ in inputs]
                topks = [t for _, t, _ in inputs]
                want = reference.low_latency_dispatch(xs, topks, e, T, use_fp8=use_fp8, round_scale=round_scale)
                experts_out = [bf16_values(y) for y in ys] if use_fp8 else [w[0] for w in want]
                want_out = reference.low_latency_combine(
                    experts_out, topks, [w for _, _, w in inputs], [w[3] for w in want]
                )[me]
                dispatch_ok = check_dispatch(first, want[me], inputs, me, e, R, use_fp8, ue8m0)
                combine_ok = exact_equal(bf16_values(first_out.to_numpy()), want_out)
                verdicts.append((dispatch_ok, combine_ok))
            graph.close()
    comm.check_async_error()
    if hook and (len(hooks) != 2 or None in hooks):
        return f"the captured calls returned the hooks {hooks}"
    return all(d is True and c for d, c in verdicts) or f"replays: {verdicts}"


def capture_without_out_case(comm, seed, n=80, h=512, k=4, e=16):
    """A capture that would make pydeepep allocate the outputs is refused before anything is launched (a graph holding
    its own allocations could not be replayed), and the communicator carries on."""
    from pydeepep.bench import CapturedGraph

    R, me = comm.nranks, comm.rank
    with cupy.cuda.Device(comm.device):
        stream = cupy.cuda.Stream(non_blocking=True)
        x, topk, _ = (dev(a) for a in make_inputs(seed, me, n, h, k, e, R))
        cupy.cuda.runtime.deviceSynchronize()
        try:
            with stream:  # CuPy's current stream: the inputs are exported without a cross-stream wait
                CapturedGraph(lambda: comm.low_latency_dispatch(x, topk, e, stream=stream.ptr), stream.ptr)
            return "a captured dispatch without out= was accepted"
        except pydeepep.DeepEPInvalidUsage as exc:
            if "out=" not in str(exc):
                return str(exc)
    return run_case(comm, seed + 1, n=n, h=h, k=k, e=e)


def disagreeing_case(comm, seed, n=32, k=4, e=16):
    """Ranks whose calls lay out the rows they exchange differently (a dispatch with another hidden, FP8 choice or
    round_scale, a combine of rows of another width) or route them by another number of experts: each rank that
    receives the other's rows gets an error naming that rank, and the ranks stay in step: a matching call afterwards
    matches the oracle."""
    R, me = comm.nranks, comm.rank
    local = e // R
    with cupy.cuda.Device(comm.device):
        x, topk, w = (dev(a) for a in make_inputs(seed, me, n, 1024, k, e, R))
        x_wide = dev(make_inputs(seed, me, n, 2048, k, e, R)[0])
        topk_half = cupy.where(topk >= 0, topk % (e // 2), -1)  # valid ids for E = e and for E = e / 2

        def combine_other_widths():
            result = comm.low_latency_dispatch(x, topk, e)
            comm.low_latency_combine(cupy.zeros((local, R * T, 1024 if me == 0 else 512), cupy.uint16), topk, w, result)

        calls = {
            "hidden": lambda: comm.low_latency_dispatch(x if me == 0 else x_wide, topk, e),
            "fp8 choice": lambda: comm.low_latency_dispatch(x, topk, e, use_fp8=me == 0),
            "round_scale": lambda: comm.low_latency_dispatch(x, topk, e, round_scale=me == 0),
            "num_experts": lambda: comm.low_latency_dispatch(x, topk_half, e if me == 0 else e // 2),
            "combine width": combine_other_widths,
        }
        # Every rank makes every call, whatever the verdict, so that the ranks stay in step.
        failures = []
        for what, call in calls.items():
            try:
                call()
                cupy.cuda.runtime.deviceSynchronize()
                comm.check_async_error()
                failures.append(f"{what}: no error")
            except pydeepep.DeepEPInvalidArgument as exc:
                # Rank 0's calls differ from all the others': it names one of them, they name rank 0.
                said = (
                    r"routed it with \d+ experts per rank" if what == "num_experts" else "called it with rows laid out"
                )
                found = re.search(rf"rank (\d+) {said}", str(exc))
                if found is None or (int(found.group(1)) == 0) == (me == 0):
                    failures.append(f"{what}: {exc}")
            finally:
                comm.clear_async_error()
        if failures:
            return "; ".join(failures)
    verdict = run_case(comm, seed + 1, n=50, h=1024, k=k, e=e)
    return True if verdict is True else f"after the refusals: {verdict}"


def one_rank_refuses_case(comm, seed, n=40, h=1024, k=4, e=16):
    """A low-latency call that only the last rank refuses on its host, by pydeepep (more tokens than T, an expert count
    that is no integer, expert outputs of the wrong shape) or by the library (rows wider than the communicator's
    hidden), also a hooked dispatch, a refused dispatch whose combine the refusing rank makes with the exception's
    refused_result, and a combine of a result whose arrays that rank gave a later dispatch as out=: that rank raises
    its refusal, every other rank finishes the call at once (well within the communicator's 20 s timeout) with
    DeepEPRemoteError naming it, and the ranks stay in step (the refused call counts as made, a refused Send needs no
    hook): a dispatch and combine afterwards match the oracle."""
    R, me = comm.nranks, comm.rank
    refuser = R - 1
    bad = me == refuser
    local = e // R
    with cupy.cuda.Device(comm.device):
        x, topk, w = (dev(a) for a in make_inputs(seed, me, n, h, k, e, R))
        many_x, many_topk, _ = (dev(a) for a in make_inputs(seed, me, T + 1, h, k, e, R))
        wide_x = dev(make_inputs(seed, me, n, 8192, k, e, R)[0])  # the communicators' hidden is 7168

        def combine_with_rows(rows):
            result = comm.low_latency_dispatch(x, topk, e)  # accepted everywhere
            comm.low_latency_combine(cupy.zeros((local, rows, h), cupy.uint16), topk, w, result)

        def dispatch_refused_then_combined():
            # The refusing rank passes its refused result on: its combine runs its side without data and raises.
            try:
                result = comm.low_latency_dispatch(many_x if bad else x, many_topk if bad else topk, e)
            except pydeepep.DeepEPInvalidArgument as exc:
                result = exc.refused_result
            comm.low_latency_combine(cupy.zeros((local, R * T, h), cupy.uint16), topk, w, result)

        def combine_of_overwritten_arrays():
            # The refusing rank gives the first result's arrays to the next dispatch (on the other set) through another
            # object: its combine of the first runs its side without data and raises. The library checks this only on
            # a buffer set no capture has used: the first dispatch must land on the set the graph scenarios left
            # alone (at 52ae0db an extra dispatch in masked_peer moved it onto the other, and the combine went through).
            first = comm.low_latency_dispatch(x, topk, e)
            fields = ("recv_x", "recv_scales", "recv_count", "recv_src_info", "recv_layout_range")
            same_arrays = types.SimpleNamespace(**{name: getattr(first, name) for name in fields})
            comm.low_latency_dispatch(x, topk, e, out=same_arrays if bad else None)
            comm.low_latency_combine(cupy.zeros((local, R * T, h), cupy.uint16), topk, w, first)

        def hooked_dispatch():
            result = comm.low_latency_dispatch(
                many_x if bad else x, many_topk if bad else topk, e, return_recv_hook=True
            )
            result.hook()

        invalid = pydeepep.DeepEPInvalidArgument
        # what -> (the call, what the refusing rank raises)
        calls = {
            "dispatch refused by pydeepep": (
                lambda: comm.low_latency_dispatch(many_x if bad else x, many_topk if bad else topk, e),
                invalid,
            ),
            "dispatch refused by the library": (
                lambda: comm.low_latency_dispatch(wide_x if bad else x, topk, e),
                invalid,
            ),
            "dispatch whose expert count is no integer": (
                lambda: comm.low_latency_dispatch(x, topk, float(e) if bad else e),
                TypeError,
            ),
            "combine": (lambda: combine_with_rows(R * T - 1 if bad else R * T), invalid),
            "hooked dispatch": (hooked_dispatch, invalid),
            "refused dispatch, then its combine": (dispatch_refused_then_combined, pydeepep.DeepEPInvalidUsage),
            "combine of a result whose arrays a later dispatch wrote": (
                combine_of_overwritten_arrays,
                pydeepep.DeepEPInvalidUsage,
            ),
        }
        failures = one_rank_refusal_failures(comm, calls, refuser, cupy.cuda.runtime.deviceSynchronize)
        if failures:
            return "; ".join(failures)
    verdict = run_case(comm, seed + 1, n=50, h=h, k=k, e=e)
    return True if verdict is True else f"after the refusals: {verdict}"


def masked_peer_case(comm, seed, n=90, h=512, k=6, e=16):
    """The last rank is masked out: every other rank masks it, and it masks every other rank. Dispatch and combine then
    run in two groups (the last rank alone, the others together), as if the ranks outside a group had no tokens and
    every slot naming their experts were -1. Taken back, the ranks still leave each other out of the combine of that
    dispatch, and work together again from the next dispatch. Before that, masked and taken back between a dispatch
    with every rank and its combine, they keep every rank in that combine. (With 2 ranks: each rank masks the
    other.)"""
    R, me = comm.nranks, comm.rank
    outcast, local = R - 1, e // R
    group = [me] if me == outcast else [r for r in range(R) if r != outcast]  # the ranks this one works with
    masked = [r for r in range(R) if r not in group]
    inputs = [make_inputs(seed, r, n, h, k, e, R) for r in range(R)]

    def seen_from(r):  # rank r's tokens as this rank's group sees them
        x, topk, w = inputs[r] if r in group else make_inputs(seed, r, 0, h, k, e, R)
        return x, np.where(np.isin(topk // local, group), topk, -1), w

    seen = [seen_from(r) for r in range(R)]
    x_mine, topk_mine, w_mine = inputs[me]
    topks = [t for _, t, _ in seen]
    want = reference.low_latency_dispatch([bf16_values(x) for x, _, _ in seen], topks, e, T)
    ys = [bf16_bits(np.random.default_rng([seed, 3, r]).standard_normal((local, R * T, h))) for r in range(R)]
    want_out = reference.low_latency_combine(
        [bf16_values(y) for y in ys], topks, [w for _, _, w in seen], [w[3] for w in want]
    )[me]
    # First a call on each buffer set with every rank: its rows stay in the combine rows that the masked ranks leave
    # alone below, so that a combine summing them would differ (two calls: later scenarios rely on which set their
    # dispatches land on). In the second, the ranks are masked and taken back between the dispatch and its combine,
    # which still has every rank: the dispatch had them all.
    verdict = run_case(comm, seed + 2, n=n, h=h, k=k, e=e)
    if verdict is not True:
        return f"before masking: {verdict}"
    everyone = reference.low_latency_dispatch([bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], e, T)
    want_everyone = reference.low_latency_combine(
        [bf16_values(y) for y in ys], [t for _, t, _ in inputs], [w for _, _, w in inputs], [w[3] for w in everyone]
    )[me]

    def take_back_and_combine(handle, want_sum, failure):
        """Takes every masked rank back, then combines the dispatch of `handle`: `failure` unless it gives want_sum."""
        for r in masked:
            comm.low_latency_mask_rank(r, masked=False)
        host_barrier(comm)
        with cupy.cuda.Device(comm.device):
            out = comm.low_latency_combine(dev(ys[me]), dev(topk_mine), dev(w_mine), handle).out
            cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        return None if exact_equal(bf16_values(out.to_numpy()), want_sum) else failure

    with cupy.cuda.Device(comm.device):
        before = comm.low_latency_dispatch(dev(x_mine), dev(topk_mine), e)
        cupy.cuda.runtime.deviceSynchronize()
    host_barrier(comm)  # no rank has a call in flight when the ranks are masked and taken back
    for r in masked:
        comm.low_latency_mask_rank(r)
    failure = take_back_and_combine(
        before, want_everyone, "masked and taken back between a dispatch and its combine: the combine differs"
    )
    if failure:
        return failure
    for r in masked:
        comm.low_latency_mask_rank(r)
    try:
        if comm.low_latency_masked_ranks() != [r in masked for r in range(R)]:
            return f"masked ranks {comm.low_latency_masked_ranks()}"
        comm.low_latency_mask_rank(me, masked=False)  # this rank: never masked, nothing to take back
        for bad, error, words in (
            (me, pydeepep.DeepEPInvalidArgument, "cannot mask itself"),
            (R, pydeepep.DeepEPInvalidArgument, f"rank is {R}; it must be in [0, {R})"),
        ):
            try:
                comm.low_latency_mask_rank(bad)
                return f"rank {bad} was masked"
            except error as exc:
                if words not in str(exc):
                    return str(exc)
        if comm.low_latency_masked_ranks() != [r in masked for r in range(R)]:
            return f"masked ranks {comm.low_latency_masked_ranks()} after this rank's take-back and the refusals"
        try:  # every rank masks one, so every rank refuses (and the ranks still count the call alike)
            comm.measure_flag_round(iterations=1)
            return "the floor was measured with a rank masked"
        except pydeepep.DeepEPInvalidUsage as exc:
            if "masked" not in str(exc):
                return str(exc)
        with cupy.cuda.Device(comm.device):
            topk_dev = dev(topk_mine)  # the real routing: the library skips the masked ranks' experts itself
            result = comm.low_latency_dispatch(dev(x_mine), topk_dev, e, return_recv_hook=True)
            # A rank is not taken back while a receive is due here: that receive would wait for it. (No extra call:
            # later scenarios rely on which buffer set their dispatches land on, as graphs have used one.) The receive
            # is made on every path, so that a failure here is reported, not hidden by the take-back below.
            try:
                try:
                    comm.low_latency_mask_rank(masked[0], masked=False)
                    comm.low_latency_mask_rank(masked[0])  # masked again, so that the receive does not wait for it
                    return "a rank was taken back while a dispatch's receive was due"
                except pydeepep.DeepEPInvalidUsage as exc:
                    if "receive of the dispatch sent on buffer set" not in str(exc):
                        return str(exc)
                if comm.low_latency_masked_ranks() != [r in masked for r in range(R)]:
                    return f"masked ranks {comm.low_latency_masked_ranks()} after the refused take-back"
            finally:
                result.hook()
            out = comm.low_latency_combine(dev(ys[me]), topk_dev, dev(w_mine), result).out
            cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        verdict = check_dispatch(result, want[me], seen, me, e, R, True, False)
        if verdict is not True:
            return f"masked: {verdict}"
        if not exact_equal(bf16_values(out.to_numpy()), want_out):
            return "masked: combine output differs"
        # Taken back on every rank, the ranks still leave each other out of that dispatch's combine: it sent them
        # nothing and laid out none of their tokens, so summing their slots would add rows of an earlier call.
        failure = take_back_and_combine(
            result, want_out, "taken back: the combine of the dispatch made while masked differs"
        )
        if failure:
            return failure
    finally:
        for r in masked:
            comm.low_latency_mask_rank(r, masked=False)
        host_barrier(comm)  # taking a rank back needs every rank idle and unmasked before the next call
    return run_case(comm, seed + 1, n=n, h=h, k=k, e=e)


def host_barrier(comm):
    """The ranks meet on the host: an exact-size high-throughput dispatch waits for every rank's counts."""
    with cupy.cuda.Device(comm.device):
        comm.dispatch(cupy.zeros((1, 256), cupy.uint16), topk_idx=cupy.zeros((1, 1), cupy.int64), num_experts=16)
        cupy.cuda.runtime.deviceSynchronize()


def ht_then_ll_case(comm, seed):
    """High-throughput dispatch and combine, then low-latency, then high-throughput again, in one communicator."""
    R, me = comm.nranks, comm.rank
    n, h, k, e = 200, 512, 4, 16
    inputs = [make_inputs(seed, r, n, h, k, e, R) for r in range(R)]
    wants = reference.dispatch([bf16_values(x) for x, _, _ in inputs], [t for _, t, _ in inputs], None, e)
    want = wants[me]
    # Each rank combines the rows it received: every token comes back summed over the ranks that got it.
    want_out = reference.combine([w[0] for w in wants], [w[4] for w in wants], [n] * R)[me]
    with cupy.cuda.Device(comm.device):
        x, topk, _ = (dev(a) for a in inputs[me])
        for round_ in range(2):
            result = comm.dispatch(x, topk_idx=topk, num_experts=e)
            cupy.cuda.runtime.deviceSynchronize()
            if not exact_equal(bf16_values(result.recv_x.to_numpy()), want[0]):
                return f"HT dispatch {round_} differs"
            out = comm.combine(result.recv_x, result.handle).out
            cupy.cuda.runtime.deviceSynchronize()
            if not exact_equal(bf16_values(out.to_numpy()), want_out):
                return f"HT combine {round_} differs"
            if round_ == 0:
                verdict = run_case(comm, seed + 1, n=100, h=1024, k=8, e=16)
                if verdict is not True:
                    return f"LL after HT: {verdict}"
    comm.check_async_error()
    return True


def stale_case(comm, seed):
    """Combine with a result whose buffer set a later dispatch reused is refused (before anything is launched)."""
    R, me = comm.nranks, comm.rank
    with cupy.cuda.Device(comm.device):
        x, topk, w = (dev(a) for a in make_inputs(seed, me, 16, 256, 2, 16, R))
        first = comm.low_latency_dispatch(x, topk, 16)
        comm.low_latency_dispatch(x, topk, 16)
        third = comm.low_latency_dispatch(x, topk, 16)
        try:
            comm.low_latency_combine(cupy.zeros((16 // R, R * T, 256), cupy.uint16), topk, w, first)
            return "a stale result was accepted"
        except pydeepep.DeepEPInvalidUsage as exc:
            if "stale" not in str(exc):
                return str(exc)
        comm.low_latency_combine(cupy.zeros((16 // R, R * T, 256), cupy.uint16), topk, w, third)
        cupy.cuda.runtime.deviceSynchronize()
    comm.check_async_error()
    return True


def flag_round_case(comm):
    """The floor diagnostic: a plausible time per kernel, twice in a row (the second call waits for words of its own
    epoch, not the first call's), bad iterations refused; the scenarios after it run on the same communicator."""
    rounds = [comm.measure_flag_round(iterations=10) for _ in range(2)]
    if not all(1.0 < us < 1000.0 for us in rounds):
        return f"flag round times {rounds} us"
    try:
        comm.measure_flag_round(iterations=0)
        return "iterations=0 was accepted"
    except pydeepep.DeepEPInvalidArgument as exc:
        if "iterations" not in str(exc):
            return str(exc)
    comm.check_async_error()
    return True


def lone_flag_round(info, timeout=5.0):
    """Every rank measures the floor once; then rank 0 alone measures again: the first measurement's words (of later
    rounds than the lone one's) must not end its waits, so it times out. Then the ranks close together."""

    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=timeout,
        max_tokens_per_rank=16,
        hidden=256,
        num_topk=2,
        num_experts=16,
        low_latency_max_tokens=16,
    ) as comm:
        comm.measure_flag_round(iterations=50)
        start = time.monotonic()
        outcome = "not called"
        if info.rank == 0:
            try:
                comm.measure_flag_round(iterations=1)
                outcome = "no error"
            except pydeepep.DeepEPTimeoutError as exc:
                outcome = (time.monotonic() - start, str(exc))
            comm.clear_async_error()
        time.sleep(max(0.0, start + 2 * timeout + 2.0 - time.monotonic()))  # the ranks reach close() together
    return outcome


# Pairs of configs whose buffers have one total size (checked below through buffer_size_hint) but which differ in what
# peers rely on: the layout (peers write into each other's buffers by it), max_tokens_per_rank (a receiver's bounds)
# or the low-latency transport (a receiver waits for the signals of its own). The sizes agreeing is not enough.
_SAME_SIZE_LL_COMMON = dict(buffer_bytes=1 << 24, max_tokens_per_rank=64, num_topk=2, num_experts=8)
SAME_SIZE_SETUPS = {
    # Low-latency areas cut two ways: T = 8 with H = 256 and T = 16 with H = 128 (16 MiB of high-throughput buffer).
    "low_latency": (
        dict(_SAME_SIZE_LL_COMMON, low_latency_max_tokens=8, hidden=256),
        dict(_SAME_SIZE_LL_COMMON, low_latency_max_tokens=16, hidden=128),
        ("for 8 tokens, hidden 256", "for 16 tokens, hidden 128"),
    ),
    # High-throughput parts 512 bytes apart, their difference hidden by the low-latency area's 4096-byte alignment:
    # the per-rank receive regions differ, so rows would land at other offsets than the receiver reads.
    "high_throughput": (
        dict(max_tokens_per_rank=63, hidden=128, num_topk=2, num_experts=8, low_latency_max_tokens=16),
        dict(max_tokens_per_rank=64, hidden=128, num_topk=2, num_experts=8, low_latency_max_tokens=16),
        ("high-throughput part",),
    ),
    "max_tokens_per_rank": (
        dict(buffer_bytes=1 << 24, max_tokens_per_rank=64),
        dict(buffer_bytes=1 << 24, max_tokens_per_rank=128),
        ("max_tokens_per_rank 64", "max_tokens_per_rank 128"),
    ),
    "low_latency_transport": (
        dict(_SAME_SIZE_LL_COMMON, low_latency_max_tokens=8, hidden=256, low_latency_transport="auto"),
        dict(_SAME_SIZE_LL_COMMON, low_latency_max_tokens=8, hidden=256, low_latency_transport="nvshmem"),
        ("low-latency transport auto", "low-latency transport nvshmem"),
    ),
}


def setup_with_rank_config(info, case):
    try:
        comm = pydeepep.Communicator(
            info.unique_id,
            info.rank,
            info.nranks,
            device=info.device,
            timeout=30,
            **SAME_SIZE_SETUPS[case][info.rank % 2],
        )
    except pydeepep.DeepEPError as exc:
        return f"{type(exc).__name__}: {exc}"
    comm.close()
    return "created"


@pytest.mark.parametrize("case", sorted(SAME_SIZE_SETUPS))
def test_ranks_whose_buffers_have_one_size_but_differ_in_what_peers_rely_on_are_refused_at_setup(case):
    first, second, words = SAME_SIZE_SETUPS[case]
    sizing = [{k: v for k, v in config.items() if k != "low_latency_transport"} for config in (first, second)]
    sizes = {pydeepep.buffer_size_hint(RANKS, **config) for config in sizing}
    assert len(sizes) == 1, sizes  # else the sizes alone would tell the layouts apart
    for outcome in spawn_ranks(setup_with_rank_config, nprocs=RANKS, args=(case,), timeout=180):
        assert outcome.startswith("DeepEPInvalidArgument") and "ranks disagree" in outcome, outcome
        assert all(word in outcome for word in words), outcome


def test_a_lone_flag_round_times_out_instead_of_reading_an_earlier_one():
    outcomes = spawn_ranks(lone_flag_round, nprocs=RANKS, timeout=180)
    assert isinstance(outcomes[0], tuple), outcomes[0]
    seconds, message = outcomes[0]
    assert "measurement" in message and seconds < 5.0 + 3.0, outcomes[0]


def stats_case(comm, seed, h=512, k=4, e=16, calls=3, delay=0.5):
    """The load statistics add up: rows per local expert over several calls (on top of what the caller put there),
    and the wait for a source rank that starts late (rank 1 sleeps before its first dispatch, and before a combine)."""

    R, me = comm.nranks, comm.rank
    local = e // R
    with cupy.cuda.Device(comm.device):
        inputs = [make_inputs(seed, r, 100, h, k, e, R) for r in range(R)]
        x, topk, weights = (dev(a) for a in inputs[me])
        # What each call receives per local expert, from the oracle (not from the kernel that keeps the statistics).
        per_call = reference.low_latency_dispatch(
            [bf16_values(i[0]) for i in inputs], [i[1] for i in inputs], e, T, use_fp8=False
        )[me][2].astype(np.int64)
        total = per_call * calls
        counts = cupy.full((local,), 7, cupy.int64)
        counts32 = cupy.full((local,), 3, cupy.int32)
        waits = cupy.zeros((R,), cupy.int64)
        cupy.cuda.runtime.deviceSynchronize()
        if me == 1:
            time.sleep(delay)
        for _ in range(calls):
            comm.low_latency_dispatch(x, topk, e, stats_recv_count=counts, stats_wait_ns=waits)
            comm.low_latency_dispatch(x, topk, e, stats_recv_count=counts32)
            cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        if not np.array_equal(counts.get(), total + 7):
            return f"stats_recv_count {counts.get().tolist()} != {(total + 7).tolist()}"
        if not np.array_equal(counts32.get(), total + 3):
            return f"int32 stats_recv_count {counts32.get().tolist()} != {(total + 3).tolist()}"
        wait = waits.get()
        if np.any(wait < 0):
            return f"negative waits {wait.tolist()}"
        if me == 0 and R > 1 and not (wait[1] >= 0.5 * delay * 1e9 and wait[1] > 10 * wait[0]):
            return f"waits per source {wait.tolist()} ns do not show rank 1 starting {delay} s late"
        try:
            comm.low_latency_dispatch(x, topk, e, stats_recv_count=cupy.zeros((local + 1,), cupy.int64))
            return "stats_recv_count of the wrong length was accepted"
        except pydeepep.DeepEPInvalidArgument as exc:
            if "stats_recv_count" not in str(exc):
                return str(exc)

        # The combine's waits, on top of what the caller put there: rank 1 starts its combine late.
        result = comm.low_latency_dispatch(x, topk, e, use_fp8=False)
        expert_out = cupy.zeros((local, R * T, h), cupy.uint16)
        combine_waits = cupy.full((R,), 5, cupy.int64)
        cupy.cuda.runtime.deviceSynchronize()
        if me == 1:
            time.sleep(delay)
        comm.low_latency_combine(expert_out, topk, weights, result, stats_wait_ns=combine_waits)
        cupy.cuda.runtime.deviceSynchronize()
        comm.check_async_error()
        wait = combine_waits.get() - 5
        if np.any(wait < 0):
            return f"combine waits {wait.tolist()} went below what the caller put there"
        if me == 0 and R > 1 and not (wait[1] >= 0.5 * delay * 1e9 and wait[1] > 10 * wait[0]):
            return f"combine waits per source {wait.tolist()} ns do not show rank 1 starting {delay} s late"
        # Refused on every rank (each runs its side without data, so the ranks stay in step): the last step.
        try:
            comm.low_latency_combine(expert_out, topk, weights, result, stats_wait_ns=cupy.zeros((R,), cupy.int32))
            return "combine stats_wait_ns of dtype int32 was accepted"
        except pydeepep.DeepEPInvalidArgument as exc:
            if "stats_wait_ns" not in str(exc):
                return str(exc)
    return True


CASES = {
    "fp8_float_scales": dict(seed=1, n=100, h=2048, k=8, e=16),
    "fp8_round_scale": dict(seed=2, n=100, h=1024, k=8, e=16, round_scale=True),
    "fp8_ue8m0": dict(seed=3, n=100, h=640, k=8, e=16, round_scale=True, ue8m0=True),
    "fp8_h7168": dict(seed=4, n=64, h=7168, k=8, e=16),
    # Fewer tokens than blocks: each row is split over blocks by 128-channel groups (56 parts of one token; one group
    # per block for three tokens of 12 groups, with UE8M0 scales).
    "one_token_fp8_h7168": dict(seed=24, n=1, h=7168, k=8, e=16),
    "three_tokens_ue8m0": dict(seed=25, n=3, h=1536, k=8, e=16, round_scale=True, ue8m0=True),
    "fp8_any_bf16_bits": dict(seed=22, n=100, h=1024, k=8, e=16, any_bits=True, combine=False),
    "bf16": dict(seed=5, n=100, h=1032, k=8, e=16, use_fp8=False),
    "bf16_h7168": dict(seed=6, n=50, h=7168, k=8, e=16, use_fp8=False),
    "e288": dict(seed=7, n=T, h=512, k=8, e=288),
    "e288_h7168_dispatch": dict(seed=8, n=T, h=7168, k=8, e=288, combine=False),
    # The most experts per rank: every receiving block lays out several of them.
    "e_loc_1024": dict(seed=23, n=T, h=256, k=8, e=1024 * RANKS),
    "minus_one_slots": dict(seed=9, n=120, h=512, k=8, e=16, drop=0.5),
    "empty_rank": dict(seed=10, n=lambda r: 0 if r == 1 else 90, h=512, k=4, e=16),
    "n_equals_t": dict(seed=11, n=T, h=1024, k=8, e=32),
    "several_experts_on_one_rank": dict(seed=12, n=100, h=512, k=6, e=8 * RANKS, to_rank=0),
    "k1": dict(seed=13, n=100, h=512, k=1, e=16),
    "k32": dict(seed=14, n=100, h=512, k=32, e=64),
    "int32_topk": dict(seed=15, n=77, h=512, k=4, e=16, index_dtype=np.int32),
    "hook": dict(seed=16, n=100, h=2048, k=8, e=16, hook=True),
    "hook_bf16_zero_copy": dict(seed=17, n=100, h=1024, k=8, e=16, use_fp8=False, hook=True, zero_copy=True),
    "zero_copy": dict(seed=18, n=90, h=1024, k=4, e=16, zero_copy=True),
    "scales_token_contiguous": dict(seed=20, n=100, h=1024, k=8, e=16, token_contiguous=True),
    "ue8m0_token_contiguous": dict(
        seed=21, n=90, h=1536, k=4, e=16, round_scale=True, ue8m0=True, token_contiguous=True
    ),
    "reruns_identical": dict(seed=19, n=T, h=2048, k=8, e=32, round_scale=True, ue8m0=True, reruns=20),
    # Tokens naming an expert twice (delivered once, summed once per slot by the combine): with 144 experts per rank
    # the receive's bit per expert modulo 128 also flags experts 128 apart; with K = 32 the repeats cross the groups
    # of eight ids the receive loads at a time.
    "repeated_experts_e288": dict(seed=26, n=T, h=512, k=8, e=288, repeats=True),
    "repeated_experts_k32": dict(seed=27, n=100, h=256, k=32, e=64, repeats=True),
    # x with rows further apart than hidden (x_row_stride): every other row of a taller array, cast to FP8 in the
    # kernel; the first hidden columns of a wider array, BF16 rows sent as they are.
    "strided_x_rows_fp8": dict(seed=28, n=100, h=1024, k=8, e=16, strided_x="rows"),
    "strided_x_columns_bf16": dict(seed=29, n=90, h=1032, k=4, e=16, use_fp8=False, strided_x="columns"),
}

EXTRA = {
    "alternating_sets": lambda comm: alternating_case(comm, 40),
    "double_hook": lambda comm: double_hook_case(comm, 50),
    "graph_replay": lambda comm: graph_case(comm, 60),
    # FP8 cast in the graph: float32 scales; power-of-two scales packed as UE8M0 (5 blocks: a partial word).
    "graph_replay_fp8": lambda comm: graph_case(comm, 100, use_fp8=True),
    "graph_replay_fp8_ue8m0": lambda comm: graph_case(comm, 110, h=640, use_fp8=True, round_scale=True, ue8m0=True),
    # Receive hooks called inside the capture: BF16 with identity experts between the two, and FP8.
    "graph_replay_hook": lambda comm: graph_case(comm, 120, hook=True),
    "graph_replay_fp8_hook": lambda comm: graph_case(comm, 130, use_fp8=True, hook=True),
    "flag_round": flag_round_case,
    "capture_without_out_refused": lambda comm: capture_without_out_case(comm, 65),
    "masked_peer": lambda comm: masked_peer_case(comm, 67),
    "disagreeing_rows_refused": lambda comm: disagreeing_case(comm, 68),
    "one_rank_refuses": lambda comm: one_rank_refuses_case(comm, 69),
    "ht_then_ll": lambda comm: ht_then_ll_case(comm, 70),
    "stale_result_refused": lambda comm: stale_case(comm, 80),
    "load_statistics": lambda comm: stats_case(comm, 85),
}


def ll_scenarios(info, transport):
    out = {}
    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=20,
        max_tokens_per_rank=256,
        hidden=7168,
        num_topk=32,
        num_experts=288,
        low_latency_max_tokens=T,
        low_latency_transport=transport,
    ) as comm:
        scenarios = [(name, lambda c, case=case: run_case(c, **case)) for name, case in CASES.items()]
        scenarios += list(EXTRA.items())
        for name, scenario in scenarios:
            try:
                out[name] = scenario(comm)
            except Exception:
                out[name] = traceback.format_exc()
            log_scenario("ll", info, f"{transport} {name}", out[name])
            if isinstance(out[name], str) and "Timeout" in out[name]:
                break  # the ranks are out of step: later scenarios would only time out too
    return out


# Every scenario runs with NVLink stores between the GPUs ("auto") and with NVSHMEM puts forced between them.
@pytest.fixture(scope="module", params=["auto", "nvshmem"])
def results(request):
    return spawn_ranks(ll_scenarios, nprocs=RANKS, args=(request.param,), timeout=300 * RANKS)


@pytest.mark.parametrize("scenario", [*CASES, *EXTRA])
def test_ll_dispatch_and_combine_match_the_oracle(results, scenario):
    assert all_true([r.get(scenario, "not run") for r in results]), [r.get(scenario) for r in results]


def one_rank_ll(info):
    out = {}
    with pydeepep.Communicator(
        info.unique_id,
        0,
        1,
        device=0,
        timeout=30,
        max_tokens_per_rank=64,
        hidden=7168,
        num_topk=8,
        num_experts=32,
        low_latency_max_tokens=T,
    ) as comm:
        for name, case in (
            ("fp8", dict(seed=90, n=100, h=2048, k=8, e=16)),
            ("decode_one_token", dict(seed=93, n=1, h=7168, k=8, e=32)),
            ("decode_ue8m0", dict(seed=94, n=32, h=7168, k=8, e=32, round_scale=True, ue8m0=True, drop=0.0)),
            ("bf16_few_tokens", dict(seed=95, n=5, h=1000, k=4, e=32, use_fp8=False)),
            ("bf16_hook", dict(seed=91, n=T, h=1024, k=4, e=8, use_fp8=False, hook=True)),
            ("ue8m0_zero_copy", dict(seed=92, n=33, h=640, k=2, e=16, round_scale=True, ue8m0=True, zero_copy=True)),
        ):
            try:
                out[name] = run_case(comm, **case)
            except Exception:
                out[name] = traceback.format_exc()
    return out
