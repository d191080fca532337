# cython: language_level=3, embedsignature=True
"""Thin Cython layer over the libdeepep C ABI (include/deepep/deepep.h)."""

import warnings

import numpy as np

from libc.string cimport memcpy

from .errors import DeepEPCudaError, DeepEPInvalidArgument, DeepEPInvalidUsage, error_for_status
from ._interop import LEGACY_DEFAULT_STREAM, PER_THREAD_DEFAULT_STREAM, check_matrix, is_device_array, stream_handle

from pydeepep.deepep cimport *

include "_array.pxi"


cdef int _check(deepepResult_t status) except -1:
    """Raises the DeepEPError subclass for a failed call (to be called with the GIL held, right after the call)."""
    if status != deepepSuccess:
        message = deepepGetLastErrorMessage().decode("utf-8", "replace")
        raise error_for_status(<int>status, message or deepepGetErrorString(status).decode())
    return 0


def version():
    """The loaded library's version as (major, minor, patch)."""
    cdef int v = 0
    _check(deepepGetVersion(&v))
    return (v // 10000, (v // 100) % 100, v % 100)


def error_string(int status):
    """Static text for a result code."""
    return deepepGetErrorString(<deepepResult_t>status).decode()


def get_unique_id():
    """A fresh bootstrap id (128 bytes). Make it on one rank and hand it to every other; needs no GPU."""
    cdef deepepUniqueId uid
    cdef deepepResult_t status
    with nogil:
        status = deepepGetUniqueId(&uid)
    _check(status)
    return bytes((<char*>uid.internal)[:DEEPEP_UNIQUE_ID_BYTES])


cdef deepepConfig _make_config(device, timeout, buffer_bytes, max_tokens_per_rank, hidden, num_topk, num_experts,
                               allow_nvlink_multicast) except *:
    cdef deepepConfig config
    _check(deepepConfigInit(&config))
    config.device = -1 if device is None else int(device)
    config.timeout_seconds = float(timeout)
    config.buffer_bytes = int(buffer_bytes)
    config.max_tokens_per_rank = int(max_tokens_per_rank)
    config.hidden = int(hidden)
    config.num_topk = int(num_topk)
    config.num_experts = int(num_experts)
    config.allow_nvlink_multicast = 1 if allow_nvlink_multicast else 0
    return config


def buffer_size_hint(int nranks, *, buffer_bytes=0, max_tokens_per_rank=4096, hidden=7168, num_topk=8,
                     num_experts=256):
    """Bytes of communication buffer per rank a workload needs on `nranks` ranks (what a Communicator with the same
    arguments allocates)."""
    cdef deepepConfig config = _make_config(None, 100.0, buffer_bytes, max_tokens_per_rank, hidden, num_topk,
                                            num_experts, False)
    cdef size_t nbytes = 0
    _check(deepepGetBufferSizeHint(&config, nranks, &nbytes))
    return nbytes


def _as_view(obj, stream):
    """A StridedMemoryView of any DLPack / CAI device array, ordered after its producer on `stream`."""
    from cuda.core.utils import StridedMemoryView

    if isinstance(obj, DeviceArray):
        # Our own arrays need no protocol round trip: order the stream after the producer and describe them.
        if obj.stream != stream:
            _make_stream_wait(obj.stream, stream)
        return obj
    if not is_device_array(obj):
        raise DeepEPInvalidArgument(
            f"expected a CUDA device array (DLPack or __cuda_array_interface__), got host data of type "
            f"{type(obj).__name__}; copy it to the device first (e.g. pydeepep.to_device)", 1)
    try:
        return StridedMemoryView(obj, stream_ptr=stream)
    except (BufferError, TypeError, AttributeError, ValueError) as exc:
        raise DeepEPInvalidArgument(
            f"expected a device array exposing DLPack or __cuda_array_interface__, got {type(obj).__name__}: {exc}",
            1) from exc


def _core_stream(handle):
    from cuda.core import LEGACY_DEFAULT_STREAM as legacy, PER_THREAD_DEFAULT_STREAM as per_thread, Stream

    if handle == LEGACY_DEFAULT_STREAM:
        return legacy
    if handle == PER_THREAD_DEFAULT_STREAM:
        return per_thread
    return Stream.from_handle(handle)


_devices = {}


def _device(int ordinal):
    """The cuda.core Device for `ordinal`, made current for this thread (cached: Device() lookups are not free)."""
    dev = _devices.get(ordinal)
    if dev is None:
        from cuda.core import Device

        dev = _devices[ordinal] = Device(ordinal)
    dev.set_current()
    return dev


def empty(shape, dtype, *, int device, stream=None):
    """A new DeviceArray, allocated stream-ordered on `stream` from the device's memory pool (contents undefined)."""
    handle = stream_handle(stream)
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= int(s)
    if nbytes == 0:
        return DeviceArray(0, shape, dtype, device, handle, None)
    buffer = _device(device).allocate(nbytes, stream=_core_stream(handle))
    array = DeviceArray(int(buffer.handle), shape, dtype, device, handle, buffer)
    # The memory is freed stream-ordered on the stream it was allocated on: keep that stream's owner alive
    # until then (a CuPy or PyTorch stream object would otherwise destroy the stream first).
    array._stream_owner = stream
    return array


def to_device(array, *, int device, stream=None):
    """Copies a NumPy array to a new DeviceArray on `device` (stream-ordered on `stream`)."""
    from cuda.bindings import driver

    host = np.ascontiguousarray(array)
    out = empty(host.shape, host.dtype, device=device, stream=stream)
    if host.nbytes:
        status, = driver.cuMemcpyHtoDAsync(out.ptr, host.ctypes.data, host.nbytes, driver.CUstream(out.stream))
        if status == driver.CUresult.CUDA_SUCCESS:
            # The host array may be freed as soon as we return: finish the (pageable) copy first.
            status, = driver.cuStreamSynchronize(driver.CUstream(out.stream))
        if status != driver.CUresult.CUDA_SUCCESS:
            raise DeepEPCudaError(f"copy to device failed: {status!r}", 3)
    return out


cdef class Communicator:
    """A communicator over `nranks` ranks (one per process and GPU), created collectively.

    Use as a context manager or call :meth:`close` on every rank: teardown is collective and never left to the
    garbage collector (ranks collect at different times).
    """

    cdef deepepComm_t _comm
    cdef readonly int rank
    cdef readonly int nranks
    cdef readonly int device
    cdef readonly int ranks_per_nvl_domain
    cdef readonly size_t buffer_bytes

    def __cinit__(self):
        self._comm = NULL

    def __init__(self, bytes unique_id, int rank, int nranks, *, device=None, double timeout=100.0,
                 buffer_bytes=0, max_tokens_per_rank=4096, hidden=7168, num_topk=8, num_experts=256,
                 allow_nvlink_multicast=False):
        if len(unique_id) != DEEPEP_UNIQUE_ID_BYTES:
            raise DeepEPInvalidArgument(
                f"unique_id has {len(unique_id)} bytes; it must be the {DEEPEP_UNIQUE_ID_BYTES} bytes that "
                "get_unique_id() returns", 1)
        cdef deepepConfig config = _make_config(device, timeout, buffer_bytes, max_tokens_per_rank, hidden,
                                                num_topk, num_experts, allow_nvlink_multicast)
        cdef deepepUniqueId uid
        memcpy(uid.internal, <const char*>unique_id, DEEPEP_UNIQUE_ID_BYTES)
        if device is not None:
            # Make the device's primary context current for this thread, so arrays allocated here land on it.
            from cuda.core import Device
            Device(int(device)).set_current()
        cdef deepepComm_t comm = NULL
        cdef deepepResult_t status
        with nogil:
            status = deepepCommInitRank(&comm, nranks, &uid, rank, &config)
        _check(status)
        self._comm = comm
        cdef int value = 0
        cdef size_t nbytes = 0
        _check(deepepCommRank(comm, &value))
        self.rank = value
        _check(deepepCommSize(comm, &value))
        self.nranks = value
        _check(deepepCommDevice(comm, &value))
        self.device = value
        _check(deepepCommRanksPerNvlDomain(comm, &value))
        self.ranks_per_nvl_domain = value
        _check(deepepCommBufferBytes(comm, &nbytes))
        self.buffer_bytes = nbytes
        if device is None:
            from cuda.core import Device
            Device(self.device).set_current()

    cdef deepepComm_t _live(self) except NULL:
        if self._comm == NULL:
            raise DeepEPInvalidUsage("the communicator is closed", 2)
        return self._comm

    @property
    def closed(self):
        return self._comm == NULL

    @property
    def stream(self):
        """The communicator's own stream, as an integer handle."""
        cdef CUstream_st* s = NULL
        _check(deepepCommGetStream(self._live(), &s))
        return <size_t>s

    def close(self):
        """Destroys the communicator (collective: every rank calls it). Calling it again does nothing."""
        if self._comm == NULL:
            return
        cdef deepepComm_t comm = self._comm
        cdef deepepResult_t status
        self._comm = NULL
        with nogil:
            status = deepepCommDestroy(comm)
        _check(status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def __del__(self):
        if self._comm != NULL:
            warnings.warn(
                f"pydeepep.Communicator (rank {self.rank}) was never closed; its resources stay allocated until the "
                "process exits. Call close() on every rank.", ResourceWarning, stacklevel=2)

    def check_async_error(self):
        """Raises the error a stream-ordered call recorded on the device (a timeout, an out-of-range expert id), if
        any. Does not wait for the stream: synchronise first to see faults of work still in flight."""
        cdef deepepResult_t found = deepepSuccess
        _check(deepepCommGetAsyncError(self._live(), &found))
        if found != deepepSuccess:
            _check(found)

    def clear_async_error(self):
        _check(deepepCommClearAsyncError(self._live()))

    def get_dispatch_layout(self, topk_idx, int num_experts, stream=None, out=None):
        """Per-rank and per-expert token counts and the token-to-rank mask of a routing decision.

        ``topk_idx``: [N, K] int64 or int32 device array (rows may be strided), entries in [-1, num_experts).
        Returns ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)``
        as DeviceArrays produced on ``stream``, or writes into ``out``, a tuple of three contiguous device arrays of
        those shapes and dtypes (uint8 accepted for the mask), and returns it. Stream-ordered; no host
        synchronisation; capturable in a CUDA graph.
        """
        cdef deepepComm_t comm = self._live()
        cdef size_t s = stream_handle(stream)
        view = _as_view(topk_idx, s)
        num_tokens, num_topk, row_stride = check_matrix(view, "topk_idx", (np.int64, np.int32), self.device)
        if num_experts <= 0 or num_experts % self.nranks != 0:
            raise DeepEPInvalidArgument(
                f"num_experts is {num_experts}; it must be a positive multiple of the number of ranks ({self.nranks})",
                1)
        if out is None:
            # Pass the caller's stream object itself: the arrays keep it alive until their memory is freed on it.
            results = (empty((self.nranks,), np.int32, device=self.device, stream=stream),
                       empty((num_experts,), np.int32, device=self.device, stream=stream),
                       empty((num_tokens, self.nranks), np.bool_, device=self.device, stream=stream))
            pointers = [a.ptr for a in results]
        else:
            if len(out) != 3:
                raise DeepEPInvalidArgument("out must be a tuple of 3 arrays", 1)
            results = tuple(out)
            pointers = [
                _out_pointer(results[0], s, "num_tokens_per_rank", (self.nranks,), (np.int32,), self.device),
                _out_pointer(results[1], s, "num_tokens_per_expert", (num_experts,), (np.int32,), self.device),
                _out_pointer(results[2], s, "is_token_in_rank", (num_tokens, self.nranks), (np.bool_, np.uint8),
                             self.device),
            ]
        cdef deepepDataType_t index_type = deepepInt64 if np.dtype(view.dtype) == np.int64 else deepepInt32
        cdef size_t topk_ptr = view.ptr
        cdef size_t rank_ptr = pointers[0]
        cdef size_t expert_ptr = pointers[1]
        cdef size_t mask_ptr = pointers[2]
        cdef int64_t n = num_tokens
        cdef int k = num_topk
        cdef int64_t stride = row_stride
        cdef deepepResult_t status
        with nogil:
            status = deepepGetDispatchLayout(comm, <const void*>topk_ptr, index_type, n, k, stride, num_experts,
                                             <int32_t*>rank_ptr, <int32_t*>expert_ptr, <uint8_t*>mask_ptr,
                                             <CUstream_st*>s)
        _check(status)
        return results


def _out_pointer(array, stream, name, shape, dtypes, int device):
    """Device pointer of a caller-provided output after checking it has exactly the needed shape and dtype."""
    view = _as_view(array, stream)
    if tuple(view.shape) != tuple(shape):
        raise DeepEPInvalidArgument(f"out {name} has shape {tuple(view.shape)}; {tuple(shape)} is needed", 1)
    if np.dtype(view.dtype) not in [np.dtype(d) for d in dtypes]:
        raise DeepEPInvalidArgument(f"out {name} has dtype {np.dtype(view.dtype).name}; it must be "
                                    + " or ".join(np.dtype(d).name for d in dtypes), 1)
    strides = getattr(view, "strides", None)
    if strides is not None:
        expected, step = [], 1
        for extent in reversed(tuple(shape)):
            expected.append(step)
            step *= max(extent, 1)
        expected = tuple(reversed(expected))
        if any(extent > 1 and st != want for extent, st, want in zip(shape, strides, expected)):
            raise DeepEPInvalidArgument(f"out {name} must be contiguous (strides {tuple(strides)})", 1)
    return view.ptr
