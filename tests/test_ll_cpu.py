"""CPU tier for the low-latency C ABI and Python layer: argument structs and their defaults, the struct layouts the
ctypes mirrors and the Cython declarations rely on, checks that need no GPU, the size of the low-latency area, and
the Python buffer-set bookkeeping."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from conftest import bogus_pointer, last_error

import pydeepep
from pydeepep import _core

SUCCESS, INVALID_ARGUMENT, INVALID_USAGE = 0, 1, 2
INT64 = 1
LL_MAX_TOKENS = 1024
LL_MAX_HIDDEN = 65528  # the flag words name hidden / 8 in 13 bits


class LowLatencyDispatchArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("buffer_set", ctypes.c_int),
        ("phase", ctypes.c_int),
        ("num_tokens", ctypes.c_int64),
        ("x", ctypes.c_void_p),
        ("hidden", ctypes.c_int),
        ("x_row_stride", ctypes.c_int64),
        ("topk_idx", ctypes.c_void_p),
        ("topk_type", ctypes.c_int),
        ("num_topk", ctypes.c_int),
        ("topk_row_stride", ctypes.c_int64),
        ("num_experts", ctypes.c_int),
        ("use_fp8", ctypes.c_int),
        ("round_scale", ctypes.c_int),
        ("use_ue8m0", ctypes.c_int),
        ("recv_x", ctypes.c_void_p),
        ("recv_scales", ctypes.c_void_p),
        ("recv_count", ctypes.c_void_p),
        ("recv_src_info", ctypes.c_void_p),
        ("recv_layout_range", ctypes.c_void_p),
        ("scales_token_contiguous", ctypes.c_int),
        ("stats_recv_count", ctypes.c_void_p),
        ("stats_recv_count_type", ctypes.c_int),
        ("stats_wait_ns", ctypes.c_void_p),
    ]


class LowLatencyCombineArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("buffer_set", ctypes.c_int),
        ("phase", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("zero_copy", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("num_experts", ctypes.c_int),
        ("src_info", ctypes.c_void_p),
        ("layout_range", ctypes.c_void_p),
        ("num_tokens", ctypes.c_int64),
        ("topk_idx", ctypes.c_void_p),
        ("topk_type", ctypes.c_int),
        ("num_topk", ctypes.c_int),
        ("topk_row_stride", ctypes.c_int64),
        ("topk_weights", ctypes.c_void_p),
        ("weights_row_stride", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("stats_wait_ns", ctypes.c_void_p),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# C ABI


def test_dispatch_args_init_fills_size_and_defaults(lib):
    args = LowLatencyDispatchArgs()
    args.hidden = 99
    assert lib.deepepLowLatencyDispatchArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))) == SUCCESS
    assert args.struct_size == ctypes.sizeof(LowLatencyDispatchArgs)
    assert (args.buffer_set, args.phase, args.topk_type, args.use_fp8) == (0, 0, INT64, 1)
    assert (args.round_scale, args.use_ue8m0, args.hidden, args.recv_x) == (0, 0, 0, None)
    assert (args.scales_token_contiguous, args.stats_recv_count, args.stats_recv_count_type) == (0, None, INT64)


def test_combine_args_init_fills_size_and_defaults(lib):
    args = LowLatencyCombineArgs()
    args.zero_copy = 1
    assert lib.deepepLowLatencyCombineArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))) == SUCCESS
    assert args.struct_size == ctypes.sizeof(LowLatencyCombineArgs)
    assert (args.buffer_set, args.phase, args.topk_type, args.zero_copy, args.out) == (0, 0, INT64, 0, None)
    assert args.stats_wait_ns is None


def test_combine_args_of_a_0_2_0_header_are_accepted_and_not_overrun(lib):
    """A program built against 0.2.0 or 0.2.1 passes the combine struct as it was then (up to `out`, without
    stats_wait_ns): Init writes that many bytes only; a size between it and today's is no header's and is refused."""
    older = LowLatencyCombineArgs.stats_wait_ns.offset
    # The released sizes (x86-64 and aarch64 alike): a change of either breaks programs built against that header.
    assert (older, ctypes.sizeof(LowLatencyCombineArgs)) == (112, 120)
    buffer = (ctypes.c_ubyte * 512)(*([0xAB] * 512))
    init = lib["deepepLowLatencyCombineArgsInit"]
    init.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert init(ctypes.addressof(buffer), older) == SUCCESS, last_error(lib)
    assert ctypes.c_size_t.from_buffer(buffer).value == older
    assert bytes(buffer)[older:] == b"\xab" * (512 - older)
    args = LowLatencyCombineArgs.from_buffer(buffer)
    assert (args.phase, args.topk_type, args.out) == (0, INT64, None)
    for size in (older + 4, older - 8):
        assert init(ctypes.addressof(buffer), size) == INVALID_ARGUMENT, size
        assert f"struct_size is {size}" in last_error(lib) and f"an older release's: {older}" in last_error(lib)
    # A struct no older release had in another size says nothing of older ones.
    assert lib.deepepLowLatencyDispatchArgsInit(ctypes.addressof(buffer), ctypes.c_size_t(16)) == INVALID_ARGUMENT
    assert "struct_size is 16" in last_error(lib) and "older" not in last_error(lib)


@pytest.mark.parametrize("function", ["deepepLowLatencyDispatchArgsInit", "deepepLowLatencyCombineArgsInit"])
def test_args_init_rejects_null(lib, function):
    assert getattr(lib, function)(None, ctypes.c_size_t(256)) == INVALID_ARGUMENT
    assert "args is NULL" in last_error(lib)


def test_masking_refuses_a_null_communicator_and_null_output(lib):
    assert lib.deepepCommLowLatencyMaskRank(None, 1, 1) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    flags = (ctypes.c_int * 2)()
    assert lib.deepepCommLowLatencyMaskedRanks(None, flags) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert lib.deepepCommLowLatencyMaskedRanks(None, None) == INVALID_ARGUMENT
    assert "masked is NULL" in last_error(lib)


def test_timeline_refuses_null_outputs_and_a_null_communicator(lib):
    blocks = ctypes.c_int(-1)
    assert lib.deepepCommLowLatencyTimeline(None, None, 0, ctypes.byref(blocks)) == INVALID_ARGUMENT
    assert "must not be NULL" in last_error(lib)
    marks = (ctypes.c_int64 * 8)()
    assert lib.deepepCommLowLatencyTimeline(None, marks, 1, ctypes.byref(blocks)) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert blocks.value == -1


def test_flag_round_diagnostic_refuses_a_null_or_dead_communicator(lib):
    us = ctypes.c_double(-1.0)
    assert lib.deepepCommMeasureFlagRound(None, 10, ctypes.byref(us), None) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert lib.deepepCommMeasureFlagRound(bogus_pointer(), 10, ctypes.byref(us), None) == INVALID_USAGE
    assert us.value == -1.0


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_ctypes_mirrors_match_the_c_struct_layouts(tmp_path):
    fields = [
        ("deepepLowLatencyDispatchArgs", LowLatencyDispatchArgs),
        ("deepepLowLatencyCombineArgs", LowLatencyCombineArgs),
    ]
    lines = []
    for c_name, mirror in fields:
        lines.append(f'printf("%zu\\n", sizeof({c_name}));')
        for name, _ in mirror._fields_:
            lines.append(f'printf("%zu\\n", offsetof({c_name}, {name}));')
    program = tmp_path / "layout.c"
    program.write_text(
        "#include <deepep/deepep.h>\n#include <stdio.h>\n#include <stddef.h>\nint main(void) {\n"
        + "\n".join(lines)
        + '\nprintf("%d %d %d\\n", (int)deepepLowLatencySendRecv, (int)deepepLowLatencySend, '
        '(int)deepepLowLatencyRecv);\nprintf("%d %d\\n", DEEPEP_LL_MAX_TOKENS, DEEPEP_LL_MAX_HIDDEN);\nreturn 0; }\n'
    )
    binary = tmp_path / "layout"
    subprocess.run(
        ["cc", "-std=c99", "-Wall", "-Werror", str(program), f"-I{pydeepep.get_include()}", "-o", str(binary)],
        check=True,
    )
    output = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split("\n")
    expected = []
    for _, mirror in fields:
        expected.append(str(ctypes.sizeof(mirror)))
        expected += [str(getattr(mirror, name).offset) for name, _ in mirror._fields_]
    assert output[: len(expected)] == expected
    assert output[len(expected)] == "0 1 2"
    assert output[len(expected) + 1] == f"{LL_MAX_TOKENS} {LL_MAX_HIDDEN}"


def test_dispatch_and_combine_need_a_live_communicator(lib):
    dispatch = LowLatencyDispatchArgs()
    lib.deepepLowLatencyDispatchArgsInit(ctypes.byref(dispatch), ctypes.c_size_t(ctypes.sizeof(dispatch)))
    assert lib.deepepLowLatencyDispatch(None, ctypes.byref(dispatch), None) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert lib.deepepLowLatencyDispatch(bogus_pointer(), ctypes.byref(dispatch), None) == INVALID_USAGE
    assert "not a live communicator" in last_error(lib)
    combine = LowLatencyCombineArgs()
    lib.deepepLowLatencyCombineArgsInit(ctypes.byref(combine), ctypes.c_size_t(ctypes.sizeof(combine)))
    assert lib.deepepLowLatencyCombine(None, ctypes.byref(combine), None) == INVALID_ARGUMENT
    assert lib.deepepLowLatencyCombine(bogus_pointer(), ctypes.byref(combine), None) == INVALID_USAGE


def test_combine_buffer_and_max_tokens_queries_refuse_bad_calls(lib):
    buffer = ctypes.c_void_p(1)
    assert lib.deepepLowLatencyGetCombineBuffer(bogus_pointer(), 0, 128, 16, None) == INVALID_ARGUMENT
    assert "buffer is NULL" in last_error(lib)
    assert lib.deepepLowLatencyGetCombineBuffer(bogus_pointer(), 0, 128, 16, ctypes.byref(buffer)) == INVALID_USAGE
    assert buffer.value is None  # cleared on failure
    value = ctypes.c_int()
    assert lib.deepepCommLowLatencyMaxTokens(None, ctypes.byref(value)) == INVALID_ARGUMENT
    assert lib.deepepCommLowLatencyMaxTokens(bogus_pointer(), None) == INVALID_ARGUMENT
    assert "max_tokens is NULL" in last_error(lib)


# ---------------------------------------------------------------------------------------------------------------------
# The low-latency area and the buffer size hint


def hint(**kwargs) -> int:
    return pydeepep.buffer_size_hint(2, **kwargs)


def test_no_low_latency_area_by_default():
    assert hint() == hint(low_latency_max_tokens=0)
    assert hint(buffer_bytes=12345 << 10) == 12345 << 10


def test_low_latency_area_holds_two_sets_of_the_worst_case():
    workload = dict(max_tokens_per_rank=128, hidden=7168, num_topk=8, num_experts=288)
    extra = hint(**workload, low_latency_max_tokens=128) - hint(**workload)
    # Per set: 144 local experts x 2 sources x 128 rows of 7168 BF16 values (the zero-copy combine buffer; the
    # dispatch receives into its first 2 x 128 rows), 128 x 8 combine rows, 128 send rows (staged for NVSHMEM puts),
    # and the expert ids of 2 x 128 tokens (with each source's experts per rank) and of this rank's 128 (8 int32 each).
    per_set = 144 * 2 * 128 * 7168 * 2 + 128 * 8 * 7168 * 2 + 128 * 7168 * 2 + 3 * 128 * 8 * 4 + 2 * 4
    assert 2 * per_set <= extra <= 2 * per_set + (8 << 20)


def test_low_latency_area_grows_with_its_workload():
    base = dict(max_tokens_per_rank=64, hidden=1024, num_topk=4, num_experts=16)
    small = hint(**base, low_latency_max_tokens=32)
    assert hint(**base, low_latency_max_tokens=64) > small
    assert hint(**{**base, "hidden": 2048}, low_latency_max_tokens=32) > small
    assert hint(**{**base, "num_experts": 32}, low_latency_max_tokens=32) > small
    assert hint(**{**base, "num_topk": 8}, low_latency_max_tokens=32) > small


def test_low_latency_area_is_added_to_an_explicit_buffer_size():
    workload = dict(hidden=1024, num_topk=4, num_experts=16)
    assert hint(buffer_bytes=8 << 20, **workload, low_latency_max_tokens=16) > 8 << 20


@pytest.mark.parametrize("tokens", [-1, LL_MAX_TOKENS + 1])
def test_low_latency_max_tokens_out_of_range_is_refused(tokens):
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="low_latency_max_tokens"):
        hint(low_latency_max_tokens=tokens)


def test_low_latency_max_tokens_at_the_limit_is_accepted():
    assert hint(hidden=128, num_topk=1, num_experts=2, low_latency_max_tokens=LL_MAX_TOKENS) > 0


def test_low_latency_area_refuses_rows_wider_than_its_flags_can_name():
    # A low-latency flag names hidden / 8 in 13 bits, so that ranks calling with different hidden sizes are told
    # apart; wider rows are refused when the config is read, not aliased.
    small = dict(num_topk=1, num_experts=2, low_latency_max_tokens=1)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"hidden is {LL_MAX_HIDDEN + 8}; with a low-latency area"):
        hint(hidden=LL_MAX_HIDDEN + 8, **small)
    assert hint(hidden=LL_MAX_HIDDEN, **small) > hint(hidden=LL_MAX_HIDDEN - 8, **small)
    # Without a low-latency area the high-throughput limit applies.
    assert hint(hidden=LL_MAX_HIDDEN + 8, num_topk=1, num_experts=2) > 0


def test_low_latency_area_needs_experts_divisible_by_ranks():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="not divisible by the number of ranks"):
        pydeepep.buffer_size_hint(3, num_experts=16, low_latency_max_tokens=8)


def test_low_latency_area_needs_a_valid_workload_even_with_buffer_bytes():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="num_topk"):
        hint(buffer_bytes=8 << 20, num_topk=0, low_latency_max_tokens=8)


# ---------------------------------------------------------------------------------------------------------------------
# Python layer


def test_low_latency_transport_must_be_auto_or_nvshmem():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="low_latency_transport is 'rdma'"):
        pydeepep.Communicator(pydeepep.get_unique_id(), 0, 1, low_latency_transport="rdma")


def test_low_latency_results_are_exported():
    assert pydeepep.LowLatencyCombineResult._fields == ("out", "hook")
    assert "recv_src_info" in pydeepep.LowLatencyDispatchResult.__slots__
    for method in ("low_latency_dispatch", "low_latency_combine", "low_latency_combine_buffer"):
        assert callable(getattr(pydeepep.Communicator, method))


class FakeResult:
    def __init__(self, buffer_set, generation):
        self.buffer_set, self.generation = buffer_set, generation


class FakeHook:
    kind = "dispatch"


def test_book_refuses_a_result_whose_set_was_reused():
    book = _core._LowLatencyBook(128)
    book.generation = [3, 2]
    book.check_current(FakeResult(0, 3), "combine")
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="stale"):
        book.check_current(FakeResult(0, 2), "combine")


class FakeArray:
    def __init__(self, ptr, nbytes=0x10):
        self.ptr, self.nbytes = ptr, nbytes


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_a_combine_is_checked_against_the_dispatch_of_its_buffer_set(tmp_path):
    """tests/c/ll_dispatch_book.cpp, built against the library's own header (libdeepep/ll_dispatch_book.hpp, host code
    alone): a combine after no dispatch or a refused one, with other sizes, given a routing array of the other set's
    dispatch, or given routing a later call's outputs (a dispatch's, its statistics, a combine's out) covered, is
    refused; sets sharing one workspace, copies, a receive alone and eager receives after a graph's sends are not, and
    what a capture records is not seen."""
    root = Path(__file__).resolve().parents[1]
    binary = tmp_path / "ll_dispatch_book"
    source = root / "tests" / "c" / "ll_dispatch_book.cpp"
    build = ["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{root / 'libdeepep'}", str(source), "-o"]
    subprocess.run([*build, str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("as expected") == 25, result.stdout


def test_book_refuses_out_arrays_the_other_sets_due_receive_writes():
    book = _core._LowLatencyBook(128)
    due = FakeHook()
    due.writes = (FakeArray(0x100), FakeArray(0x200))  # the arrays its receive writes
    book.pending[0] = due
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="arrays of the dispatch sent on buffer set 0"):
        book.check_out_arrays(1, [FakeArray(0x900), FakeArray(0x100)])
    book.check_out_arrays(1, [FakeArray(0x900), types.SimpleNamespace(ptr=0x100, nbytes=0x10)], True)  # no DeviceArray
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="arrays of the dispatch sent on buffer set 0"):
        book.check_out_arrays(1, [FakeArray(0x1F8, 0x100)])  # a larger array over the end of one of them
    book.check_out_arrays(1, [FakeArray(0x900), None, FakeArray(0x110)])  # other memory, next to it
    book.check_out_arrays(1, [FakeArray(0x100, 0)])  # an empty array covers nothing (its address may be any)
    due.kind = "combine"  # a combine's receive writes its out
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="arrays of the combine sent on buffer set 0"):
        book.check_out_arrays(1, [FakeArray(0x208)])
    book.pending[0] = None
    book.check_out_arrays(1, [FakeArray(0x100)])  # received: the memory may be written again


def test_book_refuses_a_set_whose_receive_hook_was_never_called():
    book = _core._LowLatencyBook(128)
    book.check_not_pending(1, "a dispatch")
    book.pending[1] = FakeHook()
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="receive hook of the dispatch"):
        book.check_not_pending(1, "a dispatch")
    book.check_not_pending(0, "a dispatch")  # the other set is free
