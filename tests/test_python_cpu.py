"""CPU tier for the Python package: the reference, stream and array protocol handling, DeviceArray export, errors,
the launcher and the command line. Nothing here needs a GPU."""

import copy
import ctypes
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import gpu_count

import pydeepep
from pydeepep import _interop, reference
from pydeepep.launch import LaunchError, spawn

# ---------------------------------------------------------------------------------------------------------------
# Reference: hand-checked cases.


def test_reference_layout_hand_checked():
    # 4 experts on 2 ranks: experts 0,1 on rank 0; 2,3 on rank 1.
    topk = np.array([[0, 1], [1, 2], [3, -1], [-1, -1]])
    per_rank, per_expert, in_rank = reference.dispatch_layout(topk, 4, 2)
    # token 0 -> rank 0 (twice, counted once); token 1 -> ranks 0 and 1; token 2 -> rank 1; token 3 -> nowhere
    assert per_rank.tolist() == [2, 2]
    assert per_expert.tolist() == [1, 2, 1, 1]
    assert in_rank.tolist() == [[True, False], [True, True], [False, True], [False, False]]
    assert per_rank.dtype == np.int32 and per_expert.dtype == np.int32 and in_rank.dtype == np.bool_


def test_reference_layout_counts_a_token_once_per_rank():
    topk = np.array([[0, 1, 2, 3]])  # four experts, all on rank 0 of 2 (E = 8)
    per_rank, per_expert, in_rank = reference.dispatch_layout(topk, 8, 2)
    assert per_rank.tolist() == [1, 0]
    assert per_expert.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_reference_layout_with_no_tokens():
    per_rank, per_expert, in_rank = reference.dispatch_layout(np.zeros((0, 3), np.int64), 6, 3)
    assert per_rank.tolist() == [0, 0, 0] and per_expert.tolist() == [0] * 6 and in_rank.shape == (0, 3)


def test_reference_layout_takes_per_rank_lists():
    results = reference.dispatch_layout([np.array([[0]]), np.array([[1], [1]])], 2, 2)
    assert [r[0].tolist() for r in results] == [[1, 0], [0, 2]]


@pytest.mark.parametrize("num_experts, num_ranks", [(7, 2), (0, 1), (4, 0)])
def test_reference_layout_refuses_experts_not_divisible_by_ranks(num_experts, num_ranks):
    with pytest.raises(ValueError, match="multiple"):
        reference.dispatch_layout(np.zeros((1, 1), np.int64), num_experts, num_ranks)


@pytest.mark.parametrize("bad", [-2, 4])
def test_reference_layout_refuses_out_of_range_ids(bad):
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        reference.dispatch_layout(np.array([[0, bad]]), 4, 2)


# ---------------------------------------------------------------------------------------------------------------
# Streams.


class CudaStreamProtocol:
    def __init__(self, result):
        self.result = result

    def __cuda_stream__(self):
        return self.result


class TorchLikeStream:
    cuda_stream = 0xABC0


class CupyLikeStream:
    ptr = 0xDEF0


@pytest.mark.parametrize(
    "stream, handle",
    [
        (None, 1),
        (0, 1),
        (1, 1),
        (2, 2),
        (0x7F00AA, 0x7F00AA),
        (CudaStreamProtocol((0, 0x1234)), 0x1234),
        (TorchLikeStream(), 0xABC0),
        (CupyLikeStream(), 0xDEF0),
    ],
)
def test_stream_handles_are_taken_from_every_supported_form(stream, handle):
    assert _interop.stream_handle(stream) == handle


@pytest.mark.parametrize("stream", [CudaStreamProtocol((1, 5)), CudaStreamProtocol(5), -3])
def test_bad_stream_values_are_refused_with_a_clear_error(stream):
    with pytest.raises(pydeepep.DeepEPInvalidArgument):
        _interop.stream_handle(stream)


@pytest.mark.parametrize("stream", [True, "s", 1.5, object()])
def test_objects_that_are_no_stream_raise_type_error(stream):
    # docs/python-api.md: an argument of the wrong type raises TypeError.
    with pytest.raises(TypeError, match="stream"):
        _interop.stream_handle(stream)


def test_a_refused_out_array_keeps_its_stream():
    # Checked before it becomes the call's (stream 7): its readers and its free stay on stream 5. No CUDA call is made.
    from pydeepep import _core

    counts = pydeepep.DeviceArray(0x7000, (4,), np.int32, 1, 5)
    for shape, dtypes, device, words in (
        ((4,), (np.int32,), 0, "is on device 1; this communicator uses device 0"),
        ((3,), (np.int32,), 1, r"has shape \(4,\); \(3,\) is needed"),
        ((4,), (np.int64,), 1, "has dtype int32; it must be int64"),
    ):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=words):
            _core._out_pointer(counts, 7, "counts", shape, dtypes, device)
        assert counts.stream == 5
    stats = pydeepep.DeviceArray(0x7000, (4,), np.int64, 0, 5)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"stats has shape \(4,\); \(3,\) is needed"):
        _core._stats_array(stats, 7, "stats", 3)
    assert stats.stream == 5


def test_an_array_is_no_stream_and_a_stream_or_array_is_no_event():
    # Both have a handle or pointer that the driver would take for a stream's or an event's.
    from pydeepep import _core

    array = pydeepep.DeviceArray(0x7F0000001000, (4,), np.int32, 0, 0)
    with pytest.raises(TypeError, match="it is an array, not a stream"):
        _interop.stream_handle(array)

    class RefusingInterface:  # a PyTorch tensor that requires grad: its interface raises
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")

    with pytest.raises(TypeError, match="it is an array, not a stream"):
        _interop.stream_handle(RefusingInterface())
    for wrong in (
        array,
        CudaStreamProtocol((0, 5)),
        TorchLikeStream(),
        Interface(shape=(2,), typestr="<f4"),
        RefusingInterface(),
    ):
        with pytest.raises(TypeError, match="not an event"):
            _core._event_handle(wrong)
    assert _core._event_handle(0x1234) == 0x1234


# ---------------------------------------------------------------------------------------------------------------
# Array protocol handling against fakes.


class FakeView:
    def __init__(self, shape=(10, 4), strides=None, dtype=np.int64, device_id=0, device_accessible=True):
        self.shape, self.strides, self.dtype = shape, strides, np.dtype(dtype)
        self.device_id, self.is_device_accessible = device_id, device_accessible


def test_contiguous_matrix_gives_its_row_stride():
    assert _interop.check_matrix(FakeView(), "x", (np.int64,), 0) == (10, 4, 4)


def test_strided_rows_are_accepted():
    assert _interop.check_matrix(FakeView(strides=(11, 1)), "x", (np.int64,), 0) == (10, 4, 11)


def test_non_contiguous_columns_are_refused():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="contiguous"):
        _interop.check_matrix(FakeView(strides=(8, 2)), "topk_idx", (np.int64,), 0)


def test_overlapping_rows_are_refused():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="overlapping"):
        _interop.check_matrix(FakeView(strides=(2, 1)), "topk_idx", (np.int64,), 0)


def test_wrong_dtype_is_refused_by_name():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="topk_idx has dtype float32; it must be int64 or int32"):
        _interop.check_matrix(FakeView(dtype=np.float32), "topk_idx", (np.int64, np.int32), 0)


def test_wrong_rank_is_refused():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="2-D"):
        _interop.check_matrix(FakeView(shape=(10,)), "topk_idx", (np.int64,), 0)


def test_host_memory_is_refused():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="host memory"):
        _interop.check_matrix(FakeView(device_id=-1, device_accessible=False), "topk_idx", (np.int64,), 0)


def test_non_native_byte_order_is_refused():
    # The kernels read little-endian values: byte-swapped ids or weights would be read wrong, silently.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="topk_weights has dtype >f4 in non-native byte order"):
        _interop.check_matrix(FakeView(dtype=">f4"), "topk_weights", (np.float32,), 0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="non-native"):
        _interop.payload_kind(FakeView(dtype=">u2"), "x")


def test_more_columns_than_a_c_int_are_refused():
    # hidden, num_topk and scales per row travel as C ints: 2**32 + 7168 columns must not become 7168.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="x has 4294974464 columns; at most 2147483647"):
        _interop.check_matrix(FakeView(shape=(1, 2**32 + 7168)), "x", None, 0)


class UnreadableDtypeView(FakeView):
    @property
    def dtype(self):  # as cuda.core reports a bfloat16 array when ml_dtypes is missing
        raise NotImplementedError("Support for bfloat16 within cuda-core requires ml_dtypes")

    @dtype.setter
    def dtype(self, value):
        pass


def test_an_unreadable_element_type_is_refused_with_a_hint():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"x: its element type cannot be read .* uint16"):
        _interop.payload_kind(UnreadableDtypeView(), "x")
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="element type cannot be read"):
        _interop.check_matrix(UnreadableDtypeView(), "x", None, 0)


@pytest.mark.parametrize(
    "view, problem",
    [
        (FakeView(shape=(4, 3), strides=(-3, 1)), "out recv_x must be contiguous"),  # rows reversed
        (FakeView(shape=(4, 3), strides=(1, 4)), "out recv_x must be contiguous"),  # transposed
        (FakeView(shape=(4, 3), strides=(8, 1)), "out recv_x must be contiguous"),  # a column slice
        (FakeView(shape=(4, 2), strides=None), r"out recv_x has shape \(4, 2\); \(4, 3\) is needed"),
        (FakeView(shape=(4, 3), dtype=">i4"), "out recv_x has dtype >i4 in non-native byte order"),
        (FakeView(shape=(4, 3), device_id=-1, device_accessible=False), "out recv_x is host memory"),
    ],
)
def test_outputs_must_be_dense_device_arrays_of_the_exact_shape(view, problem):
    # The kernels write an output as one dense block from its first element.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=problem):
        _interop.check_dense(view, "out recv_x", (4, 3))


def test_dense_outputs_are_accepted():
    _interop.check_dense(FakeView(shape=(4, 3), strides=(3, 1)), "out recv_x", (4, 3))
    _interop.check_dense(FakeView(shape=(4, 3), strides=None), "out recv_x", (4, 3))
    _interop.check_dense(FakeView(shape=(4, 1), strides=(1, 7)), "out recv_x", (4, 1))  # unit extents: any stride


def test_device_arrays_refuse_a_non_native_byte_order():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="non-native"):
        pydeepep.DeviceArray(0x7000, (3,), np.dtype(">f4"), 0, 0)


def test_arrays_refuse_a_negative_extent():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="negative extent"):
        pydeepep.DeviceArray(0x7000, (-2, 3), np.int32, 0, 0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="negative extent"):
        pydeepep.empty((0, -5), "int32", device=0)  # refused before any allocation (no GPU needed)
    # Extents whose product wraps in 64 bits (to 0 elements here) would describe an empty array at address 0.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="18446744073709551616 elements, more than any GPU holds"):
        pydeepep.DeviceArray(0x7000, (1 << 32, 1 << 32), np.int32, 0, 0)


def test_new_outputs_refuse_what_a_device_array_cannot_hold_before_allocating():
    # Refused before any allocation (no GPU needed), as DeviceArray itself refuses them.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="at most 8 dimensions"):
        pydeepep.empty((1,) * 9, "int32", device=0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="cannot hold dtype complex64"):
        pydeepep.empty((4,), np.complex64, device=0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="non-native"):
        pydeepep.empty((4,), np.dtype(">i4"), device=0)


@pytest.mark.parametrize("dtype", ["bfloat16", np.uint16, "uint16", np.dtype(np.uint16), "float8_e4m3fn", np.uint8])
def test_device_arrays_name_their_element_type_however_it_was_given(dtype):
    # The element types are resolved once and cached: bfloat16 and its uint16 bits must stay two types.
    for _ in range(2):
        array = pydeepep.DeviceArray(0x7000, (3, 2), dtype, 0, 0)
        want = dtype if dtype in ("bfloat16", "float8_e4m3fn") else np.dtype(dtype).name
        assert array.dtype_name == want
        assert array.dtype == (np.uint8 if want in ("float8_e4m3fn", "uint8") else np.uint16)
        assert array.shape == (3, 2) and array.size == 6


def test_an_unusual_spelling_of_an_element_type_changes_no_later_array():
    class Name(str):
        pass

    # A str subclass naming bfloat16, then plain names; a dtype with metadata, then the plain dtype.
    for given in (np.str_("bfloat16"), Name("bfloat16"), "bfloat16"):
        array = pydeepep.DeviceArray(0x7000, (2,), given, 0, 0)
        assert type(array.dtype_name) is str and array.dtype_name == "bfloat16"
    tagged = pydeepep.DeviceArray(0x7000, (2,), np.dtype(np.uint16, metadata={"tag": 1}), 0, 0)
    assert tagged.dtype_name == "uint16"
    assert pydeepep.DeviceArray(0x7000, (2,), np.uint16, 0, 0).dtype.metadata is None


@pytest.mark.parametrize("duplicate", [pickle.dumps, copy.copy, copy.deepcopy])
def test_objects_owning_device_resources_cannot_be_pickled_or_copied(duplicate):
    # A copy would own the same memory (or event) and free it a second time; spawn pickles what a rank returns.
    from pydeepep import _core

    with pytest.raises(TypeError, match="cannot be pickled or copied: it owns device memory"):
        duplicate(pydeepep.DeviceArray(0x7000, (2, 3), "bfloat16", 0, 0))
    for cls in (_core._Allocation, pydeepep.Event):  # made without __init__: no CUDA call
        with pytest.raises(TypeError, match="cannot pickle"):
            duplicate(cls.__new__(cls))


@pytest.mark.parametrize("shape", [(2**64 - 1,), (2**62, 2**62), (2**40, 2**20)])
def test_arrays_larger_than_any_gpu_are_refused_not_wrapped(shape):
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="more than any GPU holds"):
        pydeepep.empty(shape, "uint8", device=0)  # refused before any allocation (no GPU needed)


@pytest.mark.parametrize(
    "argument, value",
    [("buffer_bytes", -1), ("hidden", 2**40), ("max_tokens_per_rank", -(2**40)), ("num_experts", 2**31)],
)
def test_config_values_that_do_not_fit_are_refused_by_name(argument, value):
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"{argument} is {value}; it must be in"):
        pydeepep.buffer_size_hint(2, **{argument: value})


class FakeCAI:
    __cuda_array_interface__ = {"shape": (2,), "typestr": "<i8", "data": (0x1000, False), "version": 3}


class FakeDLPackHost:
    def __dlpack_device__(self):
        return (1, 0)


class FakeDLPackCuda:
    def __dlpack_device__(self):
        return (2, 1)


@pytest.mark.parametrize(
    "obj, expected",
    [(FakeCAI(), True), (FakeDLPackCuda(), True), (FakeDLPackHost(), False), (np.zeros(3), False), ([1, 2], False)],
)
def test_device_arrays_are_told_from_host_data(obj, expected):
    assert _interop.is_device_array(obj) is expected


class Interface:
    """An array offering only the CUDA array interface (what CuPy, Numba and PyTorch give)."""

    def __init__(self, **fields):
        self.__cuda_array_interface__ = {"data": (0x7000, False), "version": 3, "stream": None, **fields}


def test_an_interface_whose_pointer_is_no_integer_is_refused():
    from pydeepep import _core

    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="an integer is required"):
        _core._as_view(Interface(shape=(2, 4), typestr="<f4", stream=7, data=(0x7000 + 0.75, False)), 7)


@pytest.mark.parametrize(
    "fields", [dict(shape=(-3, 8), typestr="<f4"), dict(shape=(3, 8), typestr="<f4", strides=(32,))]
)
def test_an_interface_naming_no_possible_array_is_refused(fields):
    from pydeepep import _core

    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="no array has these"):
        _core._as_view(Interface(**fields), 7)


def test_interface_arrays_are_read_directly_with_strides_in_elements():
    from pydeepep import _core

    # Rows of 6 float32 with a padded row stride of 8 elements (32 bytes), produced on the caller's stream 7 (no
    # ordering needed, so no CUDA call is made).
    view = _core._as_view(Interface(shape=(4, 6), typestr="<f4", strides=(32, 4), stream=7), 7)
    assert (view.ptr, view.shape, view.strides, view.dtype) == (0x7000, (4, 6), (8, 1), np.dtype(np.float32))
    assert _interop.check_matrix(view, "x", (np.float32,), 0) == (4, 6, 8)
    contiguous = _core._as_view(Interface(shape=(3, 5), typestr="<u2"), 7)
    assert contiguous.strides is None
    assert _interop.payload_kind(contiguous, "x") == "bfloat16"
    assert _interop.check_matrix(contiguous, "x", None, 0) == (3, 5, 5)


@pytest.mark.parametrize(
    "fields",
    [
        dict(shape=(2, 2), typestr="<V2"),  # PyTorch's bfloat16: only DLPack names the element type
        dict(shape=(2, 2), typestr="<f4", version=2),  # no stream to order after (PyTorch's interface)
        dict(shape=(2, 2), typestr="<f4", mask=(0x9000, False)),
        dict(shape=(2, 2), typestr="<f4", strides=(8, 2)),  # half-element steps
    ],
)
def test_interface_arrays_the_direct_reader_cannot_describe_take_the_general_path(fields, monkeypatch):
    import cuda.core.utils

    from pydeepep import _core

    made = []

    class GeneralPath:  # stands in for cuda.core's StridedMemoryView, which needs the CUDA driver
        def __init__(self, obj, stream_ptr):
            made.append((obj, stream_ptr))

    monkeypatch.setattr(cuda.core.utils, "StridedMemoryView", GeneralPath)
    array = Interface(**fields)
    view = _core._as_view(array, 7)
    assert isinstance(view, GeneralPath)
    assert made == [(array, 7)]


def test_interface_arrays_are_checked_like_any_other():
    from pydeepep import _core

    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="non-native"):
        _interop.check_matrix(_core._as_view(Interface(shape=(2, 2), typestr=">f4"), 7), "x", None, 0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="contiguous"):
        _interop.check_matrix(_core._as_view(Interface(shape=(2, 2), typestr="<f4", strides=(8, 8)), 7), "x", None, 0)


# ---------------------------------------------------------------------------------------------------------------
# DeviceArray export (no CUDA call is made for stream=-1 or an equal stream).


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


def _capsule_pointer(capsule, name):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get(capsule, name)


def test_cuda_array_interface_describes_the_array():
    a = pydeepep.DeviceArray(0x7000, (3, 4), np.int32, 1, 0x55)
    cai = a.__cuda_array_interface__
    assert cai == {
        "shape": (3, 4),
        "typestr": "<i4",
        "data": (0x7000, False),
        "version": 3,
        "strides": None,
        "stream": 0x55,
    }


def test_cuda_array_interface_never_reports_stream_zero():
    assert pydeepep.DeviceArray(0x7000, (1,), np.int32, 0, 0).__cuda_array_interface__["stream"] == 1


def test_legacy_dlpack_capsule_describes_the_array():
    a = pydeepep.DeviceArray(0x7000, (5, 2), np.bool_, 1, 9)
    capsule = a.__dlpack__(stream=-1)
    tensor = DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    assert tensor.data == 0x7000 and (tensor.device.device_type, tensor.device.device_id) == (2, 1)
    assert tensor.ndim == 2 and [tensor.shape[i] for i in range(2)] == [5, 2]
    assert [tensor.strides[i] for i in range(2)] == [2, 1]
    assert (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) == (6, 8, 1)  # kDLBool


@pytest.mark.parametrize("max_version, version", [((1, 0), (1, 0)), ((1, 1), (1, 1)), ((1, 3), (1, 1))])
def test_versioned_dlpack_capsule_when_the_consumer_asks_for_it(max_version, version):
    a = pydeepep.DeviceArray(0x9000, (7,), np.int32, 0, 9)
    capsule = a.__dlpack__(stream=9, max_version=max_version)
    managed = DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, b"dltensor_versioned"))
    # 1.1 (the version that named the float8 codes) where the consumer reads it, never above its max_version.
    assert (managed.major, managed.minor) == version
    assert managed.dl_tensor.data == 0x9000 and managed.dl_tensor.shape[0] == 7
    assert (managed.dl_tensor.dtype.code, managed.dl_tensor.dtype.bits) == (0, 32)


def test_an_exported_capsule_keeps_the_array_alive():
    a = pydeepep.DeviceArray(0x9000, (7,), np.int32, 0, 9)
    before = sys.getrefcount(a)
    capsule = a.__dlpack__(stream=-1)
    assert sys.getrefcount(a) == before + 1
    del capsule
    assert sys.getrefcount(a) == before


def test_dlpack_device_and_refusals():
    a = pydeepep.DeviceArray(0x9000, (7,), np.int32, 3, 9)
    assert a.__dlpack_device__() == (2, 3)
    with pytest.raises(BufferError, match="copy"):
        a.__dlpack__(stream=-1, copy=True)
    with pytest.raises(BufferError, match="device"):
        a.__dlpack__(stream=-1, dl_device=(1, 0))
    with pytest.raises(BufferError, match="stream 0"):  # DLPack disallows it for CUDA: legacy or per-thread?
        a.__dlpack__(stream=0)


def test_ml_dtypes_types_are_held_as_their_bits():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for given, bits in ((ml_dtypes.bfloat16, np.uint16), (ml_dtypes.float8_e4m3fn, np.uint8)):
        array = pydeepep.DeviceArray(0x9000, (7,), given, 0, 9)
        assert array.dtype == np.dtype(bits) and array.bits().dtype_name == np.dtype(bits).name
        assert array.dtype_name == np.dtype(given).name
        assert array.__cuda_array_interface__["typestr"] == np.dtype(bits).str


def test_device_array_refuses_unsupported_dtypes():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="complex128"):
        pydeepep.DeviceArray(0x9000, (7,), np.complex128, 0, 9)
    # A name NumPy does not know is refused by pydeepep too, with the types it holds.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="'bfloat17'; it holds int32, .*bfloat16"):
        pydeepep.DeviceArray(0x9000, (7,), "bfloat17", 0, 9)


def test_device_array_extents_are_integers_never_truncated_floats():
    with pytest.raises(TypeError, match=r"shape \(2.9, 3\) must hold integers"):
        pydeepep.DeviceArray(0x9000, (2.9, 3), np.int32, 0, 9)
    with pytest.raises(TypeError, match="must hold integers"):
        pydeepep.empty((0.7,), np.int32, device=0)  # refused before any allocation (no GPU needed)
    assert pydeepep.DeviceArray(0x9000, (np.int64(2), 3), np.int32, 0, 9).shape == (2, 3)


@pytest.mark.skipif(gpu_count() > 0, reason="checks behaviour on a machine without GPUs")
@pytest.mark.parametrize("call", ["to_device", "empty", "Communicator"])
def test_a_device_this_process_cannot_see_raises_no_device(call):
    with pytest.raises(pydeepep.DeepEPNoDevice):
        if call == "to_device":
            pydeepep.to_device(np.zeros(2, np.int32), device=0)
        elif call == "empty":
            pydeepep.empty((2,), np.int32, device=0)
        else:
            pydeepep.Communicator(pydeepep.get_unique_id(), 0, 1, device=0)


def test_a_device_past_the_visible_ones_raises_no_device():
    with pytest.raises(pydeepep.DeepEPNoDevice, match="device 4096 is not visible"):
        pydeepep.to_device(np.zeros(2, np.int32), device=4096)
    with pytest.raises(pydeepep.DeepEPNoDevice, match="device 4096 is not visible"):
        pydeepep.empty((0,), np.int32, device=4096)  # nothing to allocate: still no array of a missing device


def test_bootstrap_and_reference_come_with_the_package():
    # pydeepep.reference and pydeepep.bootstrap after a plain `import pydeepep`, as documented.
    assert callable(pydeepep.reference.low_latency_dispatch) and callable(pydeepep.bootstrap.from_env)
    assert issubclass(pydeepep.LaunchError, RuntimeError)


# ---------------------------------------------------------------------------------------------------------------
# Errors, configuration, communicator without a GPU.


@pytest.mark.parametrize(
    "status, cls",
    [
        (1, pydeepep.DeepEPInvalidArgument),
        (6, pydeepep.DeepEPTimeoutError),
        (7, pydeepep.DeepEPNoDevice),
        (10, pydeepep.DeepEPBufferTooSmall),
    ],
)
def test_errors_map_status_to_class_and_survive_pickling(status, cls):
    from pydeepep.errors import error_for_status

    err = error_for_status(status, "what went wrong")
    assert type(err) is cls and err.status == status and str(err) == "what went wrong"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and back.status == status and back.message == "what went wrong"


def test_error_classes_are_also_standard_exceptions():
    assert issubclass(pydeepep.DeepEPInvalidArgument, ValueError)
    assert issubclass(pydeepep.DeepEPTimeoutError, TimeoutError)
    assert all(issubclass(c, pydeepep.DeepEPError) for c in (pydeepep.DeepEPNoDevice, pydeepep.DeepEPCudaError))


def test_error_strings_come_from_the_library():
    assert pydeepep.error_string(6) == "timeout"
    assert pydeepep.error_string(1234) == "unknown deepep result code"


def test_unique_ids_are_128_fresh_bytes():
    a, b = pydeepep.get_unique_id(), pydeepep.get_unique_id()
    assert len(a) == len(b) == 128 and a != b


@pytest.mark.parametrize(
    "nranks, max_tokens, hidden, num_topk", [(2, 3, 128, 8), (3, 1, 8, 1), (8, 4095, 7168, 8), (5, 7, 1000, 32)]
)
def test_a_workload_sized_buffer_gives_each_source_whole_256_byte_units(nranks, max_tokens, hidden, num_topk):
    # The library rounds each source's receive region (the buffer past its 1 MiB of control words, shared out among
    # the ranks) down to 256 bytes: a region sized for max_tokens_per_rank whole rows must lose nothing to that, or the
    # workload's largest call would not fit the buffer sized for it (rows are whole 128-byte lines, so an odd count
    # of them is not whole 256-byte units).
    hint = pydeepep.buffer_size_hint(nranks, max_tokens_per_rank=max_tokens, hidden=hidden, num_topk=num_topk)
    region = (hint - (1 << 20)) // nranks
    assert region % 256 == 0

    def whole(n, unit):
        return -(-n // unit) * unit

    # A BF16 dispatch row: the payload, then the source token, ids and weights (16-byte aligned), in 128-byte lines.
    bf16_row = whole(whole(2 * hidden, 16) + whole(4 * (1 + 2 * num_topk), 16), 128)
    assert region >= max_tokens * bf16_row


@pytest.mark.parametrize("nranks, max_tokens, hidden, num_topk", [(2, 4096, 7168, 8), (3, 5, 1032, 1), (8, 7, 128, 32)])
def test_a_zero_copy_dispatch_area_holds_every_token_of_every_rank_in_each_row_form(
    nranks, max_tokens, hidden, num_topk
):
    workload = dict(max_tokens_per_rank=max_tokens, hidden=hidden, num_topk=num_topk)

    def whole(n, unit):
        return -(-n // unit) * unit

    # The area starts on the first 4 KiB boundary after the rest.
    plain = pydeepep.buffer_size_hint(nranks, **workload)
    area = pydeepep.buffer_size_hint(nranks, zero_copy_dispatch=True, **workload) - whole(plain, 4096)

    forms = {"bf16": (2 * hidden, 0)}
    if hidden % 128 == 0:  # FP8 rows need whole 128-channel groups
        forms["fp8"] = (hidden, 4 * (hidden // 128))
    for form, (payload, scales) in forms.items():
        # A zero-copy row: its payload in recv_x, then a side row of the scales and the source token, ids and weights
        # (as they follow the payload in a whole-line receive-region row); 256 bytes of the area are slack.
        scales_offset = whole(payload, 16)
        row = whole(scales_offset + whole(scales, 16) + whole(4 * (1 + 2 * num_topk), 16), 128)
        side = row - scales_offset
        assert (area - 256) // (payload + side) >= nranks * max_tokens, form


def test_buffer_size_hint_follows_the_workload():
    small = pydeepep.buffer_size_hint(2, max_tokens_per_rank=128, hidden=1024)
    assert pydeepep.buffer_size_hint(4, max_tokens_per_rank=128, hidden=1024) > small
    assert pydeepep.buffer_size_hint(2, buffer_bytes=12345 << 10) == 12345 << 10
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="buffer_bytes is 12345; at least"):
        pydeepep.buffer_size_hint(2, buffer_bytes=12345)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="hidden"):
        pydeepep.buffer_size_hint(2, hidden=7)
    # The largest hidden the kernels take (DEEPEP_MAX_HIDDEN), and one row step past it.
    assert pydeepep.buffer_size_hint(2, max_tokens_per_rank=1, hidden=1 << 20) > 2 * (1 << 20) * 2
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="hidden is 1048584; .* at most 1048576"):
        pydeepep.buffer_size_hint(2, max_tokens_per_rank=1, hidden=(1 << 20) + 8)


def test_communicator_refuses_a_malformed_unique_id():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="128 bytes"):
        pydeepep.Communicator(b"short", 0, 1)


@pytest.mark.skipif(gpu_count() > 0, reason="checks behaviour on a machine without GPUs")
def test_communicator_without_a_gpu_raises_no_device():
    with pytest.raises(pydeepep.DeepEPNoDevice, match="deepepCommInitRank"):
        pydeepep.Communicator(pydeepep.get_unique_id(), 0, 1)


def test_communicator_refuses_rank_out_of_range_before_touching_a_gpu():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="rank is 3"):
        pydeepep.Communicator(pydeepep.get_unique_id(), 3, 2)


# ---------------------------------------------------------------------------------------------------------------
# Launcher (spawned processes; rank 0 makes the id, which needs no GPU).


def report_rank(info, extra):
    return (info.rank, info.nranks, info.device, info.unique_id, extra)


def fail_on_rank_one(info):
    if info.rank == 1:
        raise RuntimeError("rank one is broken")
    return info.rank


def hang_on_rank_one(info):
    import time

    if info.rank == 1:
        time.sleep(60)
    return info.rank


def return_a_lock(info):
    import threading

    return threading.Lock()  # cannot be pickled


def exit_with_seven_after_reporting(info):
    import atexit
    import os

    atexit.register(os._exit, 7)
    return info.rank


def die_while_sending_a_large_result(info):
    import os
    import signal
    import threading

    if info.rank == 1:  # killed while its 256 MB result is pickled or on its way to the parent
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return b"x" * (256 << 20)
    return info.rank


def exit_leaving_a_child_behind(info):
    import os

    os.system("sleep 20 &")  # inherits what this rank does not mark close-on-exec
    os._exit(3)


def put_rank_in(info, results):
    results.put(info.rank)
    return info.rank


def bootstrap_interface(info):
    import os

    return os.environ.get("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")


def test_spawn_returns_results_by_rank_with_a_shared_unique_id():
    results = spawn(report_rank, nprocs=3, args=("x",), timeout=120)
    assert [r[:3] for r in results] == [(0, 3, 0), (1, 3, 1), (2, 3, 2)]
    assert len({r[3] for r in results}) == 1 and len(results[0][3]) == 128
    assert all(r[4] == "x" for r in results)


def test_spawn_puts_each_rank_on_the_gpu_it_is_given():
    results = spawn(report_rank, nprocs=3, args=("x",), timeout=120, devices=[0, 0, 1])
    assert [r[:3] for r in results] == [(0, 3, 0), (1, 3, 0), (2, 3, 1)]


@pytest.mark.parametrize("devices", [[0], [0, 1, 2], [0, -1]])
def test_spawn_refuses_devices_that_do_not_give_each_rank_a_gpu(devices):
    with pytest.raises(ValueError, match=r"devices is .*each of the 2 ranks"):
        spawn(report_rank, nprocs=2, args=("x",), devices=devices)


def test_spawn_reports_the_failing_rank_with_its_traceback():
    with pytest.raises(LaunchError, match="(?s)rank 1 failed.*rank one is broken"):
        spawn(fail_on_rank_one, nprocs=2, timeout=120)


def spawn_fails_within(seconds, match, fn, **kwargs):
    """`spawn(fn, **kwargs)` raises LaunchError matching `match` in under `seconds` (not at its timeout, say)."""
    import time

    start = time.monotonic()
    with pytest.raises(LaunchError, match=match):
        spawn(fn, **kwargs)
    assert time.monotonic() - start < seconds


def test_spawn_reports_a_result_that_cannot_be_sent_back_at_once():
    spawn_fails_within(60, "(?s)rank 0 failed.*pickle", return_a_lock, nprocs=1, timeout=120)


def test_spawn_warns_of_a_rank_that_dies_after_reporting():
    with pytest.warns(RuntimeWarning, match="rank 1 exited with code 7 after reporting"):
        assert spawn(exit_with_seven_after_reporting, nprocs=2, timeout=120) == [0, 1]


def test_spawn_ends_at_its_timeout_when_a_rank_dies_in_the_middle_of_its_result():
    """A rank's result travels through a pipe only that rank writes: a rank killed while sending leaves no half
    message that the parent waits on past the timeout (a queue shared with the parent did)."""
    import time
    import warnings

    start = time.monotonic()
    try:
        with warnings.catch_warnings():  # killed after its report: a warning, and its result stands
            warnings.simplefilter("ignore", RuntimeWarning)
            outcome = spawn(die_while_sending_a_large_result, nprocs=2, timeout=20)
    except LaunchError as exc:
        outcome = str(exc)
    # Killed before or while sending: reported as a rank that ended without reporting; after: its result stands.
    assert "rank 1 exited with code -9 without reporting" in str(outcome) or outcome[0] == 0, outcome
    assert time.monotonic() - start < 50


def test_spawn_reports_a_function_its_ranks_cannot_import_with_the_traceback(tmp_path):
    # A function of a `python -c` program: the ranks have no module to import it from.
    script = (
        "from pydeepep.launch import spawn, LaunchError\n"
        "def job(info):\n"
        "    return info.rank\n"
        "try:\n"
        "    spawn(job, nprocs=1, timeout=60)\n"
        "except LaunchError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    said = out.stdout
    assert "rank 0 failed:" in said and "Traceback" in said and "job" in said, (said, out.stderr)


def test_spawn_sees_a_rank_end_without_reporting_while_its_child_lives_on():
    message = "rank 0 exited with code 3 without reporting"
    spawn_fails_within(15, message, exit_leaving_a_child_behind, nprocs=1, timeout=60)


def test_spawn_passes_multiprocessing_objects_to_its_ranks():
    import multiprocessing

    results = multiprocessing.get_context("spawn").Queue()
    assert spawn(put_rank_in, nprocs=2, args=(results,), timeout=120) == [0, 1]
    assert sorted(results.get(timeout=10) for _ in range(2)) == [0, 1]


def test_spawn_sets_the_bootstrap_interface_where_the_caller_left_it_empty(monkeypatch):
    monkeypatch.setenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "")  # an unset shell variable exported, say
    assert spawn(bootstrap_interface, nprocs=1, timeout=120) == ["lo"]
    assert os.environ["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == ""  # the caller's own environment is left as it was


def test_spawn_refuses_a_timeout_that_is_no_number_of_seconds():
    with pytest.raises(ValueError, match="timeout is nan"):
        spawn(report_rank, nprocs=1, args=("x",), timeout=float("nan"))


RANKS_THAT_WAIT = """
import os, sys, time
from pydeepep.launch import spawn

def wait(info, folder):
    # Written aside, then renamed: the test reads a pid file as soon as it exists, never an empty one.
    partial = os.path.join(folder, f"rank{info.rank}.partial")
    with open(partial, "w") as f:
        f.write(str(os.getpid()))
    os.replace(partial, os.path.join(folder, f"rank{info.rank}.pid"))
    time.sleep(120)

if __name__ == "__main__":
    spawn(wait, nprocs=2, args=(sys.argv[1],), timeout=300)
"""


def running(pid):
    """Whether process `pid` runs (a zombie nobody reaped does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_ranks_end_when_the_process_that_spawned_them_is_killed(tmp_path):
    import signal
    import time

    script = tmp_path / "ranks_that_wait.py"
    script.write_text(RANKS_THAT_WAIT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(f.read_text()) for f in sorted(tmp_path.glob("rank*.pid"))]
        assert len(pids) == 2, "the ranks did not start"
        parent.send_signal(signal.SIGTERM)  # no cleanup runs in the parent
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(pid) for pid in pids), f"ranks {pids} outlived the process that spawned them"
    finally:
        parent.kill()
        for f in tmp_path.glob("rank*.pid"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def test_spawn_without_nprocs_runs_one_rank_per_device_given():
    results = spawn(report_rank, args=("x",), timeout=120, devices=[0, 0])
    assert [r[:3] for r in results] == [(0, 2, 0), (1, 2, 0)]


def test_spawn_kills_its_ranks_when_the_caller_is_interrupted():
    import _thread
    import multiprocessing
    import threading
    import time

    ctrl_c = threading.Timer(3.0, _thread.interrupt_main)  # while the ranks still run
    ctrl_c.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            spawn(hang_on_rank_one, nprocs=2, timeout=120)
    finally:
        ctrl_c.cancel()  # spawn failing early must not interrupt a later test
    assert time.monotonic() - start < 20  # not one 30 s join per rank
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("pydeepep-rank")]


def test_spawn_kills_a_hung_job_at_its_timeout():
    spawn_fails_within(45, r"ranks \[1\] did not finish", hang_on_rank_one, nprocs=2, timeout=8)


# ---------------------------------------------------------------------------------------------------------------
# Command line.


@pytest.mark.parametrize("flag", ["--version", "--include-dir", "--lib-dir", "--cmake-dir"])
def test_command_line_prints_what_a_c_build_needs(flag, tmp_path):
    # Run outside the source tree, whose pydeepep/ (without the built extension) would shadow the installed one.
    out = subprocess.run(
        [sys.executable, "-m", "pydeepep", flag], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    value = out.stdout.strip()
    if flag == "--version":
        assert value == pydeepep.__version__ == "{}.{}.{}".format(*pydeepep.version())
    elif flag == "--include-dir":
        assert (Path(value) / "deepep" / "deepep.h").is_file() and (Path(value) / "deepep" / "version.h").is_file()
    elif flag == "--lib-dir":
        assert (Path(value) / "libdeepep.so").exists()
    else:
        assert (Path(value) / "deepepConfig.cmake").is_file()


def test_type_stub_declares_everything_the_extension_defines():
    import ast

    import pydeepep._core as core

    stub = Path(pydeepep.__file__).with_name("_core.pyi")
    declared = {n.name for n in ast.parse(stub.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined = {
        name
        for name in dir(core)
        if not name.startswith("_") and getattr(getattr(core, name), "__module__", None) == "pydeepep._core"
    }
    assert defined and defined <= declared, defined - declared


def test_bench_plot_draws_gbps_against_sms(tmp_path):
    pytest.importorskip("matplotlib")
    from pydeepep.bench import plot

    rows = [{"case": "ceiling_push", "num_tokens": 0, "sms": s, "gbps": 300.0 + s} for s in (8, 16)]
    rows += [
        {"case": "combine_bf16", "num_tokens": 4096, "sms": s, "us": 100.0, "gbps": 10.0 * s, "ratio": 0.5}
        for s in (8, 16)
    ]
    assert plot({"machine": "test", "results": [rows]}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_bench_summary_takes_each_case_whole_from_its_slowest_rank():
    from pydeepep.bench import slowest_rows

    def row(case, us, gbps, sms=24):
        return {"case": case, "num_tokens": 4096, "sms": sms, "us": us, "gbps": gbps, "ratio": gbps / 300}

    rank0 = [{"case": "ceiling_push", "num_tokens": 0, "sms": 24, "gbps": 300.0}, row("combine_bf16", 200.0, 290.0)]
    rank0 += [row("dispatch_cached_bf16", 210.0, 280.0), row("ll_flag_round", 4.0, 0.0, sms=0)]
    # Rank 1 is slower in the dispatch, lists its rows in another order and has no flag round (failed there).
    rank1 = [row("dispatch_cached_bf16", 230.0, 255.0), row("combine_bf16", 190.0, 300.0)]
    summary = slowest_rows([rank0, rank1])
    assert [(r["case"], r["us"], r["gbps"]) for r in summary] == [
        ("combine_bf16", 200.0, 290.0),
        ("dispatch_cached_bf16", 230.0, 255.0),
    ]


def test_bench_goals_take_each_goals_case_at_its_size_and_judge_it():
    from pydeepep.bench import goals_table

    rows = [
        {"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 24, "us": 119.0},  # goal 120: met
        {"case": "dispatch_cached_fp8", "num_tokens": 4096, "sms": 16, "us": 150.0},  # goal 146: missed
        {"case": "dispatch_cached_fp8", "num_tokens": 512, "sms": 24, "us": 1.0},  # no goal at this size
        {"case": "ll_combine_bf16", "num_tokens": 128, "sms": 0, "us": 25.0},  # goal 25: met (at most)
        {"case": "ceiling_push", "num_tokens": 0, "sms": 24, "gbps": 300.0},
    ]
    table = {(g["case"], g["num_tokens"], g["sms"]): g for g in goals_table(rows)}
    assert table[("dispatch_cached_fp8", 4096, 24)]["met"] is True
    assert table[("dispatch_cached_fp8", 4096, 16)]["met"] is False
    assert table[("ll_combine_bf16", 128, 0)]["met"] is True
    assert table[("combine_bf16", 4096, 24)]["us"] is None and table[("combine_bf16", 4096, 24)]["met"] is None
    assert ("dispatch_cached_fp8", 512, 24) not in table
    # "At least 4 times faster than the NCCL dispatcher's 815 µs": 203.75, not a rounded 204.
    assert {g["goal_us"] for g in goals_table([]) if "NCCL" in g["what"]} == {815.0 / 4}


def bench_goals_of(record_name, cwd):
    """`python -m pydeepep.bench --goals` on a record of docs/results, run from `cwd` (not the checkout, whose
    pydeepep/ has no built extension)."""
    record = Path(__file__).resolve().parent.parent / "docs" / "results" / record_name
    return subprocess.run(
        [sys.executable, "-m", "pydeepep.bench", "--goals", str(record)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_bench_goals_of_a_recorded_run_print_without_a_gpu(tmp_path):
    out = bench_goals_of("2026-12-01-h200x2-24b05bb.json", tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("HT dispatch FP8") and "116.9" in line and line.endswith("met") for line in lines)
    assert any(line.startswith("LL combine BF16") and " 128 " in line and "36.6" in line for line in lines)


def test_bench_goals_refuse_a_record_of_another_rank_count(tmp_path):
    out = bench_goals_of("2026-11-30-h200x4-6aaf22b.json", tmp_path)
    assert out.returncode == 2 and "goals are for 2 ranks" in out.stderr, (out.stdout, out.stderr)


def test_bench_timeline_summary_gives_median_and_max_after_the_first_start():
    from pydeepep.bench import TIMELINE_MARKS, timeline_summary

    marks = np.zeros((4, len(TIMELINE_MARKS)), np.int64)  # 4 blocks; 0 = mark not reached
    marks[:, 0] = [1000, 2000, 3000, 0]  # the fourth block never ran
    marks[:3, 1] = [3000, 4000, 11000]  # acks: 2, 3, 10 us after the first start
    marks[0, 4] = 21000  # published: one block only

    class Comm:
        def low_latency_timeline(self):
            return marks

    assert timeline_summary(Comm()) == "start 1.0/2.0, acks 3.0/10.0, published 20.0/20.0"


def test_bench_without_a_gpu_says_so_and_fails(tmp_path):
    if gpu_count() > 0:
        pytest.skip("checks behaviour on a machine without GPUs")
    out = subprocess.run([sys.executable, "-m", "pydeepep.bench"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_bench_refuses_an_unknown_low_latency_transport(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pydeepep.bench", "--ll-transport", "carrier-pigeon"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "--ll-transport" in out.stderr and "invalid choice" in out.stderr, out.stderr


def test_the_core_never_imports_an_ml_framework():
    code = (
        "import sys, pydeepep, pydeepep.reference, pydeepep.bootstrap\n"
        "print([m for m in ('torch', 'jax', 'cupy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_empty_cache_with_nothing_allocated_needs_no_gpu():
    # Nothing was allocated in this process (no GPU here): there is no pool to trim, and no CUDA call is made.
    assert pydeepep.empty_cache() is None
    assert pydeepep.empty_cache(0) is None


def test_outputs_marked_read_only_are_refused_and_same_size_types_are_taken_as_bits():
    from pydeepep import _core

    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out recv_x is read-only"):
        _core._expect(
            Interface(shape=(4, 3), typestr="<u2", data=(0x7000, True), stream=7), (4, 3), np.uint16, "recv_x", 7, 0
        )
    # int16 memory for a bfloat16 output (its bits as uint16): taken, as the message for other sizes promises.
    held = _core._expect(Interface(shape=(4, 3), typestr="<i2", stream=7), (4, 3), np.uint16, "recv_x", 7, 0)
    assert (held.ptr, held.shape, held.dtype) == (0x7000, (4, 3), np.dtype(np.uint16))
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"or another 2-byte integer type: its bits"):
        _core._expect(Interface(shape=(4, 3), typestr="<i4", stream=7), (4, 3), np.uint16, "recv_x", 7, 0)
    # A float of another kind would read the bits as its own values: float16 (torch.half) for bfloat16 bits, float32
    # for int32 counts, int32 for float32 weights, float64 for int64 ids.
    for typestr, written in (("<f2", np.uint16), ("<f4", np.int32), ("<i4", np.float32), ("<f8", np.int64)):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"has dtype .*; this call writes {np.dtype(written)}"):
            _core._expect(Interface(shape=(4, 3), typestr=typestr, stream=7), (4, 3), written, "recv_x", 7, 0)
    assert _core._expect(Interface(shape=(4, 3), typestr="<u4", stream=7), (4, 3), np.int32, "x", 7, 0).ptr == 0x7000
    # Bool and complex memory of the right size is no place for bits: a consumer would read them as its own values.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out recv_x has dtype bool"):
        _core._expect(Interface(shape=(4, 3), typestr="|b1", stream=7), (4, 3), np.uint8, "recv_x", 7, 0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out recv_topk_idx has dtype complex64"):
        _core._expect(Interface(shape=(4, 3), typestr="<c8", stream=7), (4, 3), np.int64, "recv_topk_idx", 7, 0)
    # A combine's output is named "out", not "out out".
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="^out has shape"):
        _core._expect(Interface(shape=(4, 2), typestr="<u2", stream=7), (4, 3), np.uint16, "out", 7, 0)


def _dlpack_stand_in(monkeypatch):
    """Makes any array's view one of its `dtype` at 0x7000, [4, 3], as DLPack would give (no driver needed)."""
    import types

    from pydeepep import _core

    def view_of(array, stream):
        return types.SimpleNamespace(
            ptr=0x7000,
            shape=(4, 3),
            strides=None,
            dtype=array.dtype,
            device_id=0,
            readonly=False,
            is_device_accessible=True,
        )

    monkeypatch.setattr(_core, "_general_view", view_of)
    return lambda dtype: types.SimpleNamespace(dtype=np.dtype(dtype))


def test_outputs_of_other_one_and_two_byte_raw_types_are_refused(monkeypatch):
    # ml_dtypes' 1- and 2-byte types other than the two written as bits (float8_e5m2, float4_e2m1fn, ...) are of kind
    # V, as these raw types are.
    from pydeepep import _core

    array_of = _dlpack_stand_in(monkeypatch)
    for raw, written in (("V1", np.uint8), ("V2", np.uint16)):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"has dtype .*; this call writes {np.dtype(written)}"):
            _core._expect(array_of(raw), (4, 3), written, "recv_x", 7, 0)


def test_outputs_of_ml_dtypes_types_are_taken_only_for_the_bits_they_hold(monkeypatch):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from pydeepep import _core

    array_of = _dlpack_stand_in(monkeypatch)
    assert _core._expect(array_of(ml_dtypes.float8_e4m3fn), (4, 3), np.uint8, "recv_x", 7, 0).ptr == 0x7000
    assert _core._expect(array_of(ml_dtypes.bfloat16), (4, 3), np.uint16, "out", 7, 0).ptr == 0x7000
    for other, written in ((ml_dtypes.float8_e5m2, np.uint8), (ml_dtypes.float8_e4m3fnuz, np.uint8)):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match="; this call writes uint8"):
            _core._expect(array_of(other), (4, 3), written, "recv_x", 7, 0)


def test_an_array_that_refuses_to_be_exported_is_refused_with_its_reason():
    from pydeepep import _core

    class RequiresGrad:  # as a PyTorch CUDA tensor that requires grad answers both protocols
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, **kwargs):
            raise BufferError("Can't export tensors that require gradient, use tensor.detach()")

    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="got RequiresGrad: .*require.* grad"):
        _core._as_view(RequiresGrad(), 7)


def test_only_a_pydeepep_array_names_its_payload_type_itself():
    from pydeepep import _core

    class Claims(Interface):
        dtype_name = "bfloat16"  # but its elements are 4-byte floats

    claims = Claims(shape=(4, 8), typestr="<f4", stream=7)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="x has dtype float32; it must be bfloat16"):
        _core._payload_kind(claims, _core._as_view(claims, 7))
    mine = pydeepep.DeviceArray(0x7000, (4, 8), "bfloat16", 0, 7)
    assert _core._payload_kind(mine, _core._as_view(mine, 7)) == "bfloat16"


def test_an_empty_array_says_so_in_its_cuda_array_interface():
    assert pydeepep.DeviceArray(0x7000, (0, 3), "bfloat16", 0, 5).__cuda_array_interface__["data"] == (0, False)
    assert pydeepep.DeviceArray(0x7000, (2, 3), "bfloat16", 0, 5).__cuda_array_interface__["data"] == (0x7000, False)


def test_output_and_input_checks_on_pydeepep_arrays_need_no_gpu():
    # The same stream as the arrays' own: no CUDA call is made.
    from pydeepep import _core

    recv_x = pydeepep.DeviceArray(0x7000, (4, 3), "bfloat16", 0, 5)
    assert _core._expect(recv_x, (4, 3), np.uint16, "recv_x", 5, 0) is recv_x
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"this call writes \(4, 2\) of uint16"):
        _core._expect(recv_x, (4, 2), np.uint16, "recv_x", 5, 0)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out recv_scales is given but this call does not"):
        _core._expect(recv_x, None, None, "recv_scales", 5, 0)
    y = pydeepep.DeviceArray(0x8000, (2, 3, 8), "bfloat16", 0, 5)
    assert _core._array3(y, 5, "x", (2, 3, 8), ("bfloat16",), 0)[0] == 0x8000
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"x has shape \(2, 3, 8\); \(2, 3, 16\) is needed"):
        _core._array3(y, 5, "x", (2, 3, 16), ("bfloat16",), 0)
    stats = pydeepep.DeviceArray(0x9000, (7,), np.int64, 0, 5)
    assert _core._stats_array(stats, 5, "stats_wait_ns", 7)[2] == "int64"
    counts = pydeepep.DeviceArray(0x9100, (2,), np.int64, 0, 5)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out num_tokens_per_rank has dtype int64; it must be"):
        _core._out_pointer(counts, 5, "num_tokens_per_rank", (2,), (np.int32,), 0)
    # A float8 array holds its values as uint8 bits, but it is no uint8 mask.
    mask = pydeepep.DeviceArray(0x9200, (4, 2), "uint8", 0, 5)
    assert _core._out_pointer(mask, 5, "is_token_in_rank", (4, 2), (np.bool_, np.uint8), 0) == 0x9200
    fp8 = pydeepep.DeviceArray(0x9300, (4, 2), "float8_e4m3fn", 0, 5)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="has dtype float8_e4m3fn; it must be bool or uint8"):
        _core._out_pointer(fp8, 5, "is_token_in_rank", (4, 2), (np.bool_, np.uint8), 0)


def test_an_out_array_over_another_librarys_memory_is_held_by_the_call_that_writes_it():
    from pydeepep import _core

    class Memory:
        pass

    memory = Memory()  # another library's array, which only its view keeps alive
    given = pydeepep.DeviceArray(0x7000, (4, 3), "bfloat16", 0, 5, owner=_core._OtherLibrarysMemory(memory))
    _core._taken.by_stream = {}  # inside a call (_InCall)
    try:
        assert _core._expect(given, (4, 3), np.uint16, "recv_x", 5, 0) is given
        assert _core._taken.by_stream == {5: [given]}
    finally:
        _core._taken.by_stream = None


def test_int_arguments_past_32_bits_are_refused_with_the_library_error():
    import operator

    from pydeepep._core import _c_int

    # The calls' int arguments go through operator.index (integers only), then _c_int (fits the C field).
    assert _c_int("num_sms", operator.index(np.int64(24))) == 24
    assert _c_int("num_sms", -(1 << 31)) == -(1 << 31)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"num_sms is 1099511627776; it must be in \["):
        _c_int("num_sms", operator.index(1 << 40))


def test_counts_given_as_floats_are_refused_not_truncated():
    """docs/python-api.md: a count or index that is no integer raises TypeError (a C int argument would take 2.9 as
    2), and one too large for its C field names the argument; the checks come before any GPU is needed."""
    uid = bytes(128)  # DEEPEP_UNIQUE_ID_BYTES; its contents are never read here
    refused_as_type = {
        "buffer_size_hint(nranks)": lambda: pydeepep.buffer_size_hint(2.9),
        "Communicator(rank)": lambda: pydeepep.Communicator(uid, 0.7, 1),
        "Communicator(nranks)": lambda: pydeepep.Communicator(uid, 0, 1.5),
        "empty(device)": lambda: pydeepep.empty((4,), "uint8", device=0.9),
        "to_device(device)": lambda: pydeepep.to_device(np.zeros(4, np.uint8), device=0.9),
        "DeviceArray(device_id)": lambda: pydeepep.DeviceArray(0, (4,), "uint8", 0.9, None),
        "DeviceArray(ptr)": lambda: pydeepep.DeviceArray(1.0, (4,), "uint8", 0, None),
    }
    outcomes = {}
    for name, call in refused_as_type.items():
        try:
            call()
            outcomes[name] = "accepted"
        except Exception as exc:
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    taken = {name: said for name, said in outcomes.items() if not said.startswith("TypeError: ")}
    assert not taken, taken
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"nranks is 1099511627776; it must be in \["):
        pydeepep.buffer_size_hint(1 << 40)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"rank is 1099511627776; it must be in \["):
        pydeepep.Communicator(uid, 1 << 40, 1)
    assert pydeepep.buffer_size_hint(np.int64(2)) == pydeepep.buffer_size_hint(2)
    from cuda.bindings import driver  # an address may come as cuda.bindings' CUdeviceptr (no __index__)

    assert pydeepep.DeviceArray(driver.CUdeviceptr(4096), (4,), "uint8", 0, None).ptr == 4096


def test_bench_records_the_commit_the_package_was_built_from(tmp_path, monkeypatch):
    from pydeepep import bench

    installed = Path(bench.__file__).with_name("_build_commit.txt")
    if installed.exists():  # written by setup.py at build time: a commit, "-dirty" where the tree differed, or unknown
        assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?|unknown)\n", installed.read_text()), installed.read_text()
    monkeypatch.delenv("DEEPEP_COMMIT", raising=False)
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "bench.py"))
    assert bench.git_commit() == "unknown"  # no record, and no guess from whatever repository lies around
    (tmp_path / "_build_commit.txt").write_text("0123abc-dirty\n")
    assert bench.git_commit() == "0123abc-dirty"
    monkeypatch.setenv("DEEPEP_COMMIT", "given")
    assert bench.git_commit() == "given"


def test_bench_keeps_the_sections_that_ran_and_fails_when_one_did_not(tmp_path, monkeypatch, capsys):
    from pydeepep import bench

    def fake_spawn(fn, nprocs, args, timeout):
        if fn is bench.bench_ll_rank:
            raise LaunchError("rank 1 failed: boom")
        return [[{"case": "combine_bf16", "num_tokens": 512, "sms": 24, "us": 40.0 + rank}] for rank in range(nprocs)]

    monkeypatch.setattr(bench, "local_device_count", lambda: 2)
    monkeypatch.setattr(bench.pydeepep, "spawn", fake_spawn)
    monkeypatch.setattr(bench, "plot", lambda record, path: False)
    output = tmp_path / "r.json"
    assert bench.main(["--modes", "ht,ll", "--output", str(output)]) == 1
    record = json.loads(output.read_text())
    assert record["failed_sections"] == {"ll": "rank 1 failed: boom"}
    assert [[row["us"] for row in rows] for rows in record["results"]] == [[40.0], [41.0]]
    assert "section ll failed: rank 1 failed: boom" in capsys.readouterr().err
    assert bench.main(["--modes", "ht", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["failed_sections"] == {}


def test_bench_refuses_an_unknown_mode(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pydeepep.bench", "--modes", "ht,LL"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 2 and "--modes: unknown LL (choose from ht, zc, ll)" in out.stderr, out.stderr


def test_a_cuda_core_that_drops_dlpack_byte_offsets_is_refused(monkeypatch):
    import cuda.core

    from pydeepep import _core

    monkeypatch.setattr(cuda.core, "__version__", "1.1.1")
    monkeypatch.setattr(_core, "_cuda_core_checked", False)
    with pytest.raises(pydeepep.DeepEPNotSupported, match=r"cuda.core 1.1.1 is installed; pydeepep needs 1.2"):
        _core._require_cuda_core_with_offsets()
    monkeypatch.setattr(cuda.core, "__version__", "1.2.0")
    _core._require_cuda_core_with_offsets()
    assert _core._cuda_core_checked is True
