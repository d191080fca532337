"""Stream and array protocol handling, kept free of CUDA calls so it can be checked without a GPU.

Streams: a ``cuda.core`` Stream, anything whose ``__cuda_stream__()`` returns ``(0, handle)``, a PyTorch stream
(``.cuda_stream``), a CuPy stream (``.ptr``), or a raw integer handle. ``None`` and ``0`` mean the legacy default
stream, spelled ``1`` everywhere here (the CUDA array interface reserves 0, and the runtime and driver accept 1 as
the legacy default stream).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import DeepEPInvalidArgument

LEGACY_DEFAULT_STREAM = 1
PER_THREAD_DEFAULT_STREAM = 2


def stream_handle(stream: Any) -> int:
    """The raw CUstream handle (an int) of any supported stream object; None means the legacy default stream."""
    if stream is None:
        return LEGACY_DEFAULT_STREAM
    if isinstance(stream, bool):
        raise TypeError(f"stream must be a stream object or an integer handle, not {stream!r}")
    if offers_array(stream):  # its .ptr is no stream's
        raise TypeError(f"cannot take a CUDA stream from {type(stream).__name__}: it is an array, not a stream")
    if isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "__cuda_stream__"):
        protocol = stream.__cuda_stream__()
        if not (isinstance(protocol, tuple) and len(protocol) == 2 and protocol[0] == 0):
            raise DeepEPInvalidArgument(
                f"{type(stream).__name__}.__cuda_stream__() returned {protocol!r}; expected (0, handle)"
            )
        handle = int(protocol[1])
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        handle = int(stream.cuda_stream)
    elif hasattr(stream, "ptr") and not callable(stream.ptr):  # cupy.cuda.Stream
        handle = int(stream.ptr)
    else:
        raise TypeError(
            f"cannot take a CUDA stream from {type(stream).__name__}: pass a cuda.core Stream, an object with "
            "__cuda_stream__, a PyTorch or CuPy stream, or an integer handle"
        )
    if handle < 0:
        raise DeepEPInvalidArgument(f"stream handle {handle} is negative")
    return LEGACY_DEFAULT_STREAM if handle == 0 else handle


_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def offers_array(obj: Any) -> bool:
    """Whether `obj` offers an array protocol (CUDA array interface or DLPack), also one that refuses it now."""
    try:
        return hasattr(obj, "__cuda_array_interface__") or hasattr(obj, "__dlpack__")
    except Exception:  # the interface raises (a PyTorch tensor that requires grad): still an array
        return True


def is_device_array(obj: Any) -> bool:
    """Whether `obj` offers CUDA device memory through DLPack or the CUDA array interface (no CUDA call made)."""
    try:
        if hasattr(obj, "__cuda_array_interface__"):
            return True
    except Exception:  # it has the interface but refuses it now (a PyTorch tensor that requires grad): say why later
        return True
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is None:
        return False
    try:
        device_type, _ = dlpack_device()
    except Exception:
        return False
    return int(device_type) in _DLPACK_CUDA_DEVICES


# C element types (deepepDataType_t) of the dtypes the ABI takes.
DTYPE_CODES = {
    np.dtype(np.int32): 0,
    np.dtype(np.int64): 1,
    np.dtype(np.float32): 2,
    np.dtype(np.uint8): 5,
    np.dtype(np.bool_): 5,
}


_DTYPE_NAMES: dict = {}


def dtype_name(dtype: Any) -> str:
    """`np.dtype(dtype).name`, cached: NumPy computes names in Python, slowly enough to show in every call."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = np.dtype(dtype).name
    return name


# The C ABI takes column counts (hidden, num_topk, scales per row) as C ints.
INT32_MAX = 2**31 - 1

_NATIVE: dict = {}


def view_dtype(view: Any, name: str) -> np.dtype:
    """The NumPy dtype of a view's elements, in this machine's byte order (the kernels read memory as little-endian
    values). An element type the array library cannot describe is refused with what to pass instead."""
    try:
        dtype = view.dtype
        native = _NATIVE.get(dtype)
        if native is None:
            native = _NATIVE[dtype] = np.dtype(dtype).isnative
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise DeepEPInvalidArgument(
            f"{name}: its element type cannot be read ({exc}); pass bfloat16 or float8 data as its bits, a uint16 or "
            "uint8 view of the same memory (for example tensor.view(torch.uint16))"
        ) from exc
    if not native:
        raise DeepEPInvalidArgument(
            f"{name} has dtype {np.dtype(dtype).str} in non-native byte order; convert it first (for example "
            "array.astype(array.dtype.newbyteorder('=')))"
        )
    return dtype


_ALLOWED: dict = {}


def _allowed_names(dtypes: tuple) -> frozenset:
    names = _ALLOWED.get(dtypes)
    if names is None:
        names = _ALLOWED[dtypes] = frozenset(np.dtype(d).name for d in dtypes)
    return names


def check_matrix(
    view: Any, name: str, dtypes: tuple | None, device: int, ncols: int | None = None
) -> tuple[int, int, int]:
    """Checks a 2-D strided view (a StridedMemoryView or anything with ptr/shape/strides/dtype/device_id) and returns
    (rows, cols, row_stride in elements). Rows may be strided; elements inside a row must be contiguous."""
    require_device_memory(view, name, f" on device {device}")
    dtype = view_dtype(view, name)
    if dtypes is not None and dtype_name(dtype) not in _allowed_names(dtypes):
        allowed = " or ".join(np.dtype(d).name for d in dtypes)
        raise DeepEPInvalidArgument(f"{name} has dtype {dtype_name(dtype)}; it must be {allowed}")
    shape = tuple(view.shape)
    if len(shape) != 2:
        raise DeepEPInvalidArgument(f"{name} has shape {shape}; it must be 2-D")
    rows, cols = shape
    if cols > INT32_MAX:
        raise DeepEPInvalidArgument(f"{name} has {cols} columns; at most {INT32_MAX} are supported")
    if ncols is not None and cols != ncols:
        raise DeepEPInvalidArgument(f"{name} has {cols} columns; {ncols} are needed")
    strides = view.strides
    if strides is None or rows == 0:
        return rows, cols, cols
    row_stride, col_stride = strides
    if cols > 1 and col_stride != 1:
        raise DeepEPInvalidArgument(
            f"{name} has element strides {tuple(strides)}; elements of a row must be contiguous (stride 1)"
        )
    if rows > 1 and row_stride < cols:
        raise DeepEPInvalidArgument(f"{name} has row stride {row_stride} < {cols} columns (overlapping rows)")
    return rows, cols, max(row_stride, cols) if rows > 1 else cols


def payload_kind(view: Any, name: str) -> str:
    """ "bfloat16" or "float8_e4m3fn" for a payload view: true bfloat16 / float8 dtypes, or their raw bits held as
    2-byte / 1-byte integers (NumPy and CuPy have no such dtypes)."""
    dtype = np.dtype(view_dtype(view, name))
    if dtype.itemsize == 2 and (dtype.kind in "ui" or dtype_name(dtype) == "bfloat16"):
        return "bfloat16"
    if dtype.itemsize == 1 and (dtype.kind in "ui" or dtype_name(dtype) == "float8_e4m3fn"):
        return "float8_e4m3fn"
    raise DeepEPInvalidArgument(
        f"{name} has dtype {dtype.name}; it must be bfloat16 or float8_e4m3fn (or their bits as uint16 / uint8)"
    )


def require_device_memory(view: Any, name: str, where: str = "") -> None:
    """Refuses host memory. Which device holds the memory is checked by the library itself (from the pointer's own
    attributes)."""
    if not getattr(view, "is_device_accessible", True) or view.device_id < 0:
        raise DeepEPInvalidArgument(f"{name} is host memory; it must be a device array{where}")


def check_dense(view: Any, name: str, shape: tuple) -> np.dtype:
    """Checks a device array the kernels write or read as one dense block from its first element (an output, say):
    exactly `shape`, C-contiguous, elements in native byte order. Returns its dtype."""
    require_device_memory(view, name)
    dtype = view_dtype(view, name)
    if tuple(view.shape) != tuple(shape):
        raise DeepEPInvalidArgument(f"{name} has shape {tuple(view.shape)}; {tuple(shape)} is needed")
    strides = getattr(view, "strides", None)
    if strides is None:
        return dtype
    expected, step = [], 1
    for extent in reversed(tuple(shape)):
        expected.append(step)
        step *= max(extent, 1)
    if len(strides) != len(shape) or any(
        extent > 1 and st != want for extent, st, want in zip(shape, strides, reversed(expected), strict=True)
    ):
        raise DeepEPInvalidArgument(f"{name} must be contiguous (strides {tuple(strides)})")
    return dtype
