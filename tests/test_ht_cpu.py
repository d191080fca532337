"""CPU tier for the high-throughput C ABI: argument structs, handles and argument checks that need no GPU, through
ctypes alone, plus the struct layouts the Cython declarations rely on (checked against the C compiler)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
from conftest import bogus_pointer, last_error

import pydeepep

SUCCESS, INVALID_ARGUMENT, INVALID_USAGE = 0, 1, 2
INT64, FLOAT32, BFLOAT16 = 1, 2, 3


class DispatchArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("num_tokens", ctypes.c_int64),
        ("topk_idx", ctypes.c_void_p),
        ("topk_type", ctypes.c_int),
        ("num_topk", ctypes.c_int),
        ("topk_row_stride", ctypes.c_int64),
        ("num_experts", ctypes.c_int),
        ("expert_alignment", ctypes.c_int),
        ("num_worst_tokens", ctypes.c_int64),
        ("num_sms", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("x_type", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("x_row_stride", ctypes.c_int64),
        ("x_scales", ctypes.c_void_p),
        ("scales_type", ctypes.c_int),
        ("num_scales", ctypes.c_int),
        ("scales_row_stride", ctypes.c_int64),
        ("topk_weights", ctypes.c_void_p),
        ("weights_row_stride", ctypes.c_int64),
        ("recv_x", ctypes.c_void_p),
        ("recv_scales", ctypes.c_void_p),
        ("recv_topk_idx", ctypes.c_void_p),
        ("recv_topk_weights", ctypes.c_void_p),
        ("recv_src_idx", ctypes.c_void_p),
        ("num_recv_tokens_per_expert", ctypes.c_void_p),
        ("num_recv_rows", ctypes.c_int64),
        ("report_recv_counts", ctypes.c_int),
        ("reserved", ctypes.c_int),
    ]


class CombineArgs(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("x", ctypes.c_void_p),
        ("hidden", ctypes.c_int),
        ("num_rows", ctypes.c_int64),
        ("x_row_stride", ctypes.c_int64),
        ("topk_weights", ctypes.c_void_p),
        ("num_topk", ctypes.c_int),
        ("weights_row_stride", ctypes.c_int64),
        ("bias", ctypes.c_void_p * 2),
        ("bias_row_stride", ctypes.c_int64 * 2),
        ("out", ctypes.c_void_p),
        ("out_topk_weights", ctypes.c_void_p),
    ]


def test_dispatch_args_init_fills_size_and_defaults(lib):
    args = DispatchArgs()
    assert lib.deepepDispatchArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))) == SUCCESS
    assert args.struct_size == ctypes.sizeof(DispatchArgs)
    assert (args.topk_type, args.expert_alignment, args.x_type, args.scales_type) == (INT64, 1, BFLOAT16, FLOAT32)
    assert (args.num_worst_tokens, args.num_sms, args.num_tokens, args.report_recv_counts) == (0, 0, 0, 0)


def test_combine_args_init_fills_size_and_zeroes(lib):
    args = CombineArgs()
    args.hidden = 99
    assert lib.deepepCombineArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))) == SUCCESS
    assert args.struct_size == ctypes.sizeof(CombineArgs) and args.hidden == 0 and args.out is None


@pytest.mark.parametrize("function", ["deepepDispatchArgsInit", "deepepCombineArgsInit"])
def test_args_init_rejects_null(lib, function):
    assert getattr(lib, function)(None, ctypes.c_size_t(256)) == INVALID_ARGUMENT
    assert "args is NULL" in last_error(lib)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_ctypes_mirrors_match_the_c_struct_layouts(tmp_path):
    program = tmp_path / "layout.c"
    program.write_text(
        "#include <deepep/deepep.h>\n#include <stdio.h>\n#include <stddef.h>\n"
        'int main(void) { printf("%zu %zu %zu %zu %zu %zu\\n", sizeof(deepepDispatchArgs), '
        "offsetof(deepepDispatchArgs, num_recv_rows), offsetof(deepepDispatchArgs, report_recv_counts), "
        "sizeof(deepepCombineArgs), "
        "offsetof(deepepCombineArgs, bias_row_stride), offsetof(deepepCombineArgs, out_topk_weights)); return 0; }\n"
    )
    binary = tmp_path / "layout"
    subprocess.run(["cc", "-std=c99", str(program), f"-I{pydeepep.get_include()}", "-o", str(binary)], check=True)
    sizes = [int(v) for v in subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()]
    assert sizes == [
        ctypes.sizeof(DispatchArgs),
        DispatchArgs.num_recv_rows.offset,
        DispatchArgs.report_recv_counts.offset,
        ctypes.sizeof(CombineArgs),
        CombineArgs.bias_row_stride.offset,
        CombineArgs.out_topk_weights.offset,
    ]


def test_handle_create_needs_a_communicator(lib):
    handle = ctypes.c_void_p(1)
    assert lib.deepepHandleCreate(None, ctypes.byref(handle)) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert handle.value is None  # cleared on failure


def test_handle_create_refuses_a_bogus_communicator(lib):
    handle = ctypes.c_void_p()
    assert lib.deepepHandleCreate(bogus_pointer(), ctypes.byref(handle)) == INVALID_USAGE
    assert "not a live communicator" in last_error(lib)


def test_handle_create_rejects_a_null_out_pointer(lib):
    assert lib.deepepHandleCreate(bogus_pointer(), None) == INVALID_ARGUMENT
    assert "handle is NULL" in last_error(lib)


def test_handle_destroy_accepts_null_and_refuses_bogus_handles(lib):
    assert lib.deepepHandleDestroy(None) == SUCCESS
    assert lib.deepepHandleDestroy(bogus_pointer()) == INVALID_USAGE
    assert "not a live handle" in last_error(lib)


@pytest.mark.parametrize("query", ["deepepHandleGetNumRecvTokens", "deepepHandleGetNumTokens"])
def test_handle_queries_refuse_bogus_handles_and_null_outputs(lib, query):
    value = ctypes.c_int64()
    assert getattr(lib, query)(bogus_pointer(), ctypes.byref(value)) == INVALID_USAGE
    assert getattr(lib, query)(bogus_pointer(), None) == INVALID_ARGUMENT


def test_waiting_for_reported_counts_needs_a_live_handle(lib):
    assert lib.deepepHandleWaitRecvCounts(None) == INVALID_ARGUMENT
    assert "handle is NULL" in last_error(lib)
    assert lib.deepepHandleWaitRecvCounts(bogus_pointer()) == INVALID_USAGE
    assert "not a live handle" in last_error(lib)


def test_per_expert_counts_query_refuses_bad_calls(lib):
    counts = (ctypes.c_int32 * 4)()
    assert lib.deepepHandleGetRecvTokensPerExpert(bogus_pointer(), counts, 4) == INVALID_USAGE
    assert lib.deepepHandleGetRecvTokensPerExpert(bogus_pointer(), None, 4) == INVALID_ARGUMENT
    assert "counts is NULL" in last_error(lib)


@pytest.mark.parametrize("function", ["deepepDispatchNotify", "deepepDispatch"])
def test_dispatch_calls_need_a_live_communicator(lib, function):
    args = DispatchArgs()
    lib.deepepDispatchArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    assert getattr(lib, function)(None, ctypes.byref(args), bogus_pointer(), None) == INVALID_ARGUMENT
    assert "comm is NULL" in last_error(lib)
    assert getattr(lib, function)(bogus_pointer(), ctypes.byref(args), bogus_pointer(), None) == INVALID_USAGE


def test_combine_needs_a_live_communicator(lib):
    args = CombineArgs()
    lib.deepepCombineArgsInit(ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    assert lib.deepepCombine(None, ctypes.byref(args), bogus_pointer(), None) == INVALID_ARGUMENT
    assert lib.deepepCombine(bogus_pointer(), ctypes.byref(args), bogus_pointer(), None) == INVALID_USAGE


def test_push_bandwidth_diagnostic_refuses_bad_calls(lib):
    gbps = ctypes.c_double()
    assert lib.deepepCommMeasurePushBandwidth(bogus_pointer(), 8, ctypes.c_size_t(1 << 20), 3, None, None) == (
        INVALID_ARGUMENT
    )
    assert "gb_per_s is NULL" in last_error(lib)
    assert lib.deepepCommMeasurePushBandwidth(None, 8, ctypes.c_size_t(1 << 20), 3, ctypes.byref(gbps), None) == (
        INVALID_ARGUMENT
    )


def test_python_handle_needs_a_communicator():
    with pytest.raises(TypeError):
        pydeepep.Handle(None)
    with pytest.raises(TypeError):
        pydeepep.Handle(object())


def test_dispatch_result_names_its_fields():
    assert pydeepep.DispatchResult._fields == (
        "recv_x",
        "recv_scales",
        "recv_topk_idx",
        "recv_topk_weights",
        "num_recv_tokens_per_expert",
        "recv_src_idx",
        "handle",
        "event",
    )
    assert pydeepep.CombineResult._fields == ("out", "topk_weights", "event")


def test_bfloat16_and_float8_arrays_export_their_true_dlpack_types():
    bf16 = pydeepep.DeviceArray(0x1000, (4, 8), "bfloat16", 0, 7)
    fp8 = pydeepep.DeviceArray(0x2000, (4, 128), "float8_e4m3fn", 0, 7)
    assert (bf16.dtype, bf16.dtype_name, bf16.nbytes) == (pydeepep_np().uint16, "bfloat16", 64)
    assert (fp8.dtype, fp8.dtype_name, fp8.nbytes) == (pydeepep_np().uint8, "float8_e4m3fn", 512)
    # The CUDA array interface (which has no such types) shows the raw bits.
    assert bf16.__cuda_array_interface__["typestr"] == "<u2" and fp8.__cuda_array_interface__["typestr"] == "|u1"


def pydeepep_np():
    import numpy

    return numpy


def test_bits_view_shares_memory_and_keeps_the_array_alive():
    import sys

    bf16 = pydeepep.DeviceArray(0x1000, (4, 8), "bfloat16", 0, 7)
    before = sys.getrefcount(bf16)
    raw = bf16.bits()
    assert (raw.ptr, raw.shape, raw.dtype_name, raw.stream) == (0x1000, (4, 8), "uint16", 7)
    assert sys.getrefcount(bf16) == before + 1
    plain = pydeepep.DeviceArray(0x2000, (3,), "int32", 0, 7)
    assert plain.bits() is plain


def test_a_bounded_dispatchs_own_overflow_is_told_from_a_recorded_fault_by_the_message():
    """pydeepep gives a bounded dispatch whose rows overflow this rank's bound a refused_handle (the peers combine),
    but not one whose wait failed on a fault recorded on the device (every rank raises): it tells them apart by the
    "asynchronous error" that the library puts before every recorded fault's message, and that the wait's own
    overflow message lacks."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    validation = (root / "libdeepep" / "validation.cpp").read_text()
    api = (root / "libdeepep" / "api_ht.cpp").read_text()
    core = (root / "pydeepep" / "_core.pyx").read_text()
    assert 'std::string("asynchronous error: ") + text' in validation
    wait = api[api.index("deepepResult_t deepepHandleWaitRecvCounts(") :]
    own = wait[wait.index("fail(deepepBufferTooSmall") :]
    own = own[: own.index(";")]
    assert "rows arrive but the outputs hold" in own and "asynchronous error" not in own
    assert 'owed.dispatch_made = "asynchronous error" not in str(exc)' in core


def test_a_refused_dispatchs_handle_is_handed_to_its_exception():
    # pydeepep's dispatch and the adapter's refusals both hand exc.refused_handle over through this one helper.
    give = pydeepep._core._give_refused_handle
    exc = pydeepep.DeepEPInvalidArgument("refused", 1)
    marker = object()
    give(exc, marker)
    assert exc.refused_handle is marker
    plain = ValueError("no handle")
    give(plain, None)
    assert not hasattr(plain, "refused_handle")
