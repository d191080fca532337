# cython: language_level=3, embedsignature=True, auto_pickle=False
"""Thin Cython layer over the libdeepep C ABI (include/deepep/deepep.h)."""
# auto_pickle=False: these classes own device memory, events and handles of this process; a pickled or copied one
# would free or destroy them a second time (pickle, copy and deepcopy raise TypeError instead).

cimport cython

import collections
import operator
import re
import threading
import warnings

import numpy as np

from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_INCREF
from libc.string cimport memcpy

from .errors import (DeepEPBufferTooSmall, DeepEPCudaError, DeepEPInvalidArgument, DeepEPInvalidUsage,
                     DeepEPNoDevice, DeepEPNotSupported, DeepEPOutOfMemory, error_for_status)
from ._interop import (LEGACY_DEFAULT_STREAM, check_dense, check_matrix, dtype_name, is_device_array, offers_array,
                       payload_kind, stream_handle)

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


def _c_int(str name, value, object low=-2**31, object high=2**31 - 1):
    """`value` as a Python int that fits a C field (the library checks its meaning): a clear error naming the argument
    instead of an OverflowError. A count must be an integer (TypeError otherwise), never a truncated float or a
    string."""
    cdef object number = operator.index(value)
    if not low <= number <= high:
        raise DeepEPInvalidArgument(f"{name} is {number}; it must be in [{low}, {high}]", 1)
    return number


def _address(value):
    """A device address: an integer, or an object that converts to one (cuda.bindings' CUdeviceptr has __int__ only);
    never a float or a string, which would be taken as some other number."""
    if isinstance(value, (float, str, bytes)):
        raise TypeError(f"ptr is {type(value).__name__} {value!r}; it must be an integer device address")
    return _c_int("ptr", value if hasattr(value, "__index__") else int(value), 0, 2**64 - 1)


cdef deepepConfig _make_config(device, timeout, buffer_bytes, max_tokens_per_rank, hidden, num_topk, num_experts,
                               allow_nvlink_multicast, low_latency_max_tokens=0,
                               low_latency_transport="auto", zero_copy_dispatch=False) except *:
    cdef deepepConfig config
    _check(deepepConfigInit(&config, sizeof(config)))
    config.device = -1 if device is None else _c_int("device", device)
    config.timeout_seconds = float(timeout)
    config.buffer_bytes = _c_int("buffer_bytes", buffer_bytes, 0, 2**64 - 1)
    config.max_tokens_per_rank = _c_int("max_tokens_per_rank", max_tokens_per_rank)
    config.hidden = _c_int("hidden", hidden)
    config.num_topk = _c_int("num_topk", num_topk)
    config.num_experts = _c_int("num_experts", num_experts)
    config.allow_nvlink_multicast = 1 if allow_nvlink_multicast else 0
    config.low_latency_max_tokens = _c_int("low_latency_max_tokens", low_latency_max_tokens)
    transports = {"auto": DEEPEP_LL_TRANSPORT_AUTO, "nvshmem": DEEPEP_LL_TRANSPORT_NVSHMEM}
    if low_latency_transport not in transports:
        raise DeepEPInvalidArgument(
            f"low_latency_transport is {low_latency_transport!r}; it must be 'auto' or 'nvshmem'", 1)
    config.low_latency_transport = transports[low_latency_transport]
    config.zero_copy_dispatch = 1 if zero_copy_dispatch else 0
    return config


def buffer_size_hint(nranks, *, buffer_bytes=0, max_tokens_per_rank=4096, hidden=7168, num_topk=8,
                     num_experts=256, low_latency_max_tokens=0, zero_copy_dispatch=False):
    """Bytes of communication buffer per rank a workload needs on `nranks` ranks (what a Communicator with the same
    arguments allocates)."""
    cdef deepepConfig config = _make_config(None, 100.0, buffer_bytes, max_tokens_per_rank, hidden, num_topk,
                                            num_experts, False, low_latency_max_tokens, "auto", zero_copy_dispatch)
    cdef size_t nbytes = 0
    _check(deepepGetBufferSizeHint(&config, _c_int("nranks", nranks), &nbytes))
    return nbytes


cdef class _InterfaceView:
    """What the checks read of an array that the CUDA array interface describes: pointer, shape, strides in elements
    (None when C-contiguous) and element type. Which device holds the memory the library checks from the pointer."""
    cdef readonly size_t ptr
    cdef readonly tuple shape
    cdef readonly object strides
    cdef readonly object dtype
    cdef readonly int device_id
    cdef readonly bint readonly  # the interface marks the memory read-only
    cdef readonly object array  # keeps the memory alive while the view is in use


cdef dict _INTERFACE_DTYPES = {}


cdef _InterfaceView _interface_view(obj, size_t stream):
    """A view of `obj` read from its __cuda_array_interface__ directly (a few microseconds, where a
    StridedMemoryView costs about ten), ordered after the producer's stream on `stream`; None where the interface is
    missing or unreadable, older than version 3 (no stream to order after; PyTorch's), names its elements only as raw
    bytes, or uses what this reader does not handle (masks, strides that are not whole elements): the caller then
    takes the general path."""
    try:
        interface = obj.__cuda_array_interface__
        # Before version 3 the interface names no stream (PyTorch's still does not): DLPack orders the call after the
        # producer instead.
        if interface.get("version", 0) < 3 or interface.get("mask") is not None:
            return None
        typestr = interface["typestr"]
        dtype = _INTERFACE_DTYPES.get(typestr)
        if dtype is None:
            dtype = _INTERFACE_DTYPES[typestr] = np.dtype(typestr)
        if dtype.kind == "V":  # raw bytes (PyTorch's bfloat16): the element type only DLPack names
            return None
        shape = tuple(operator.index(extent) for extent in interface["shape"])  # no float truncated to an extent
        strides = interface.get("strides")
        if strides is not None:
            itemsize = dtype.itemsize
            if any(step % itemsize for step in strides):
                return None
            strides = tuple(step // itemsize for step in strides)
        ptr, readonly = interface["data"]
        ptr = 0 if ptr is None else operator.index(ptr)
        producer = interface.get("stream")
    except Exception:  # the general path reads it, or refuses it with cuda.core's reason
        return None
    if any(extent < 0 for extent in shape) or (strides is not None and len(strides) != len(shape)):
        raise DeepEPInvalidArgument(
            f"{type(obj).__name__}'s __cuda_array_interface__ gives shape {shape} and strides "
            f"{interface.get('strides')}: no array has these", 1)
    if producer is not None and producer != stream:
        _make_stream_wait(producer, stream)
    cdef _InterfaceView view = _InterfaceView.__new__(_InterfaceView)
    view.ptr = ptr
    view.shape = shape
    view.strides = strides
    view.dtype = dtype
    view.device_id = 0
    view.readonly = bool(readonly)
    view.array = obj
    return view


_cuda_core_checked = False


def _require_cuda_core_with_offsets():
    """cuda.core before 1.2 takes a DLPack array's data pointer without its byte offset, so a view would name the
    wrong memory: refused (pyproject asks for 1.2; an install without dependency resolution may still hold less)."""
    global _cuda_core_checked
    if _cuda_core_checked:
        return
    import cuda.core

    version = getattr(cuda.core, "__version__", "0")
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < (1, 2):
        raise DeepEPNotSupported(
            f"cuda.core {version} is installed; pydeepep needs 1.2 or later (earlier releases drop a DLPack array's "
            "byte offset, so its data would be read from the wrong address): pip install 'cuda-core>=1.2'", 8)
    _cuda_core_checked = True


def _as_view(obj, stream):
    """A view of any DLPack / CAI device array (ptr, shape, strides in elements, dtype), ordered after its producer
    on `stream`. Inside a call, a view of another library's array is held until the work the call queues on `stream`
    is done (_InCall): the view keeps the array, and the DLPack capsule taken from it, alive."""
    if isinstance(obj, DeviceArray):
        # Our own arrays need no protocol round trip: order the stream after the producer and describe them.
        if obj.stream != stream:
            _make_stream_wait(obj.stream, stream)
        view = obj
    else:
        view = _interface_view(obj, stream) or _general_view(obj, stream)
    _keep_for_call(view, stream)
    return view


def _general_view(obj, stream):
    """cuda.core's view of a DLPack / CAI device array that _interface_view does not read."""
    from cuda.core.utils import StridedMemoryView

    if not is_device_array(obj):
        raise DeepEPInvalidArgument(
            f"expected a CUDA device array (DLPack or __cuda_array_interface__), got host data of type "
            f"{type(obj).__name__}; copy it to the device first (e.g. pydeepep.to_device)", 1)
    _require_cuda_core_with_offsets()
    # cuda.core >= 1.2.2 deprecates the constructor for array-interface objects in favour of from_any_interface.
    make = getattr(StridedMemoryView, "from_any_interface", None) or StridedMemoryView
    try:
        return make(obj, stream_ptr=stream)
    except (BufferError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        # RuntimeError: PyTorch's for the interface of a tensor that requires grad (its DLPack export raises
        # BufferError); the message says to detach it.
        raise DeepEPInvalidArgument(
            f"expected a device array exposing DLPack or __cuda_array_interface__, got {type(obj).__name__}: {exc}",
            1) from exc


_devices = {}


def _device(int ordinal):
    """The cuda.core Device for `ordinal`, made current for this thread (cached: Device() lookups are not free).
    Without a driver, or past the devices this process sees, DeepEPNoDevice, as the library reports it."""
    dev = _devices.get(ordinal)
    if dev is None:
        _check_visible(ordinal)
        from cuda.core import Device

        dev = _devices[ordinal] = Device(ordinal)
    dev.set_current()
    return dev


def empty(shape, dtype, *, device, stream=None):
    """A new DeviceArray, allocated stream-ordered on `stream` from pydeepep's memory pool on `device` (contents
    undefined). Freed memory stays in that pool for later outputs."""
    return _empty_group(((shape, dtype),), _c_int("device", device), stream)[0]


cdef size_t _GROUP_ALIGNMENT = 256
_MAX_ALLOCATION = 1 << 48  # bytes: more than any GPU holds


cdef _leading_rows(array, int64_t rows):
    """The first `rows` rows of a DeviceArray (None stays None), sharing its memory and keeping it alive."""
    if array is None or array.shape[0] == rows:
        return array
    cdef DeviceArray whole = <DeviceArray>array
    cdef DeviceArray view = _new_array(whole.ptr, (rows,) + whole.shape[1:], (whole.dtype, whole.dtype_name),
                                       whole.device_id, whole.stream, whole._owner)
    view._stream_owner = whole._stream_owner
    view._base = whole._base  # a bits() view holds its memory through its base
    return view


def _empty_group(specs, int device, stream):
    """DeviceArrays for the (shape, dtype) pairs of `specs` (None gives None) in one allocation: a call's small outputs
    cost one pool allocation instead of one each. Each array starts on a 256-byte boundary; the memory is freed once
    every array of the group is gone (keep large outputs out of groups, so that a small array kept alone does not
    keep them alive)."""
    cdef size_t handle = stream_handle(stream)
    cdef list parts = []  # (shape, element type, offset or None) per spec
    total = 0  # Python integers: sizes never wrap around
    cdef int sized = 0
    for spec in specs:
        if spec is None:
            parts.append(None)
            continue
        shape = _checked_shape(spec[0])
        element = _element_type(spec[1])
        nbytes = element[0].itemsize
        for extent in shape:
            nbytes *= extent
        parts.append((shape, element, total if nbytes else None))
        if nbytes:
            sized += 1
        total += (nbytes + _GROUP_ALIGNMENT - 1) // _GROUP_ALIGNMENT * _GROUP_ALIGNMENT
    if total > _MAX_ALLOCATION:
        raise DeepEPInvalidArgument(
            f"shapes {[part[0] for part in parts if part is not None]} need {total} bytes, more than any GPU holds", 1)
    _check_visible(device)  # also where nothing is allocated: no array names a device that is not there
    block = _allocate(total, device, handle) if total else None
    if block is not None:
        (<_Allocation>block).shared = sized > 1
        (<_Allocation>block).stream_owner = stream
    arrays = []
    for part in parts:
        if part is None:
            arrays.append(None)
            continue
        shape, element, offset = part
        if offset is None:
            array = _new_array(0, shape, element, device, handle, None)
        else:
            array = _new_array(<size_t>(<_Allocation>block).ptr + <size_t>offset, shape, element, device, handle, block)
        # The memory is freed stream-ordered on the stream it was allocated on, and consumers wait for that stream:
        # keep its owner alive until then (a CuPy or PyTorch stream object would otherwise destroy the stream first).
        array._stream_owner = stream
        arrays.append(array)
    return arrays


def to_device(array, *, device, stream=None):
    """Copies a NumPy array to a new DeviceArray on `device` (stream-ordered on `stream`)."""
    from cuda.bindings import driver

    device = _c_int("device", device)
    host = np.require(array, requirements="C")  # not ascontiguousarray, which makes a 0-d array 1-d
    if not host.dtype.isnative:
        host = host.astype(host.dtype.newbyteorder("="))  # the device reads little-endian values
    # The device's context current for the copy (one on the legacy default stream goes to the current context's
    # device), and the caller's again after it.
    _check_visible(device)  # first: DeepEPNoDevice where no driver is
    with _OnDevice(device):
        out = empty(host.shape, host.dtype, device=device, stream=stream)
        if host.nbytes:
            status, = driver.cuMemcpyHtoDAsync(out.ptr, host.ctypes.data, host.nbytes, driver.CUstream(out.stream))
            if status == driver.CUresult.CUDA_SUCCESS:
                # The host array may be freed as soon as we return: finish the (pageable) copy first.
                status, = driver.cuStreamSynchronize(driver.CUstream(out.stream))
            if status != driver.CUresult.CUDA_SUCCESS:
                raise DeepEPCudaError(f"copy to device failed: {status!r}", 3)
    return out


DispatchResult = collections.namedtuple(
    "DispatchResult",
    ["recv_x", "recv_scales", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert", "recv_src_idx",
     "handle", "event"])
DispatchResult.__doc__ = """What a dispatch returns. ``recv_x`` [rows, H] (bfloat16 or float8_e4m3fn), ``recv_scales``
[rows, S] for FP8 (else None), ``recv_topk_idx`` [rows, K] int64 receiver-local expert ids (-1 elsewhere; None
without topk_idx), ``recv_topk_weights`` [rows, K] float32 (None without weights), ``num_recv_tokens_per_expert``
a list of ints (empty in worst-case mode), ``recv_src_idx`` [rows] int32 source token of each row (-1 in padding),
``handle`` the routing for combine and cached dispatches, ``event`` an :class:`Event` with ``async_finish``."""

CombineResult = collections.namedtuple("CombineResult", ["out", "topk_weights", "event"])
CombineResult.__doc__ = """What a combine returns: ``out`` [N, H] bfloat16, ``topk_weights`` [N, K] float32 (None
without weights), ``event`` an :class:`Event` with ``async_finish``."""


def _event_handle(event):
    """The CUevent handle of a pydeepep Event, a cuda.core Event, a CuPy / PyTorch event or an integer."""
    if isinstance(event, Event):
        return (<Event>event).handle
    # A stream or an array has a handle or pointer too, which the driver would take for an event's.
    if offers_array(event) or any(hasattr(event, name) for name in ("__cuda_stream__", "cuda_stream", "wait_event")):
        raise TypeError(
            f"cannot take a CUDA event from {type(event).__name__}: it is a stream or an array, not an event")
    for attribute in ("handle", "ptr", "cuda_event"):  # cuda.core, CuPy, PyTorch
        if hasattr(event, attribute):
            return int(getattr(event, attribute))
    if isinstance(event, int) and not isinstance(event, bool):
        return event
    raise TypeError(f"cannot take a CUDA event from {type(event).__name__}: pass a pydeepep, cuda.core, CuPy or "
                    "PyTorch event, or an integer handle")


def _wait_event(stream, event):
    from cuda.bindings import driver

    _driver_result(driver.cuStreamWaitEvent(driver.CUstream(stream), driver.CUevent(_event_handle(event)), 0),
                   "waiting for previous_event")


cdef class Event:
    """A CUDA event marking the end of an asynchronous call. ``wait(stream)`` makes a stream wait for it (no host
    wait); ``synchronize()`` waits on the host; ``query()`` tells whether it has happened; ``handle`` is the raw
    CUevent for other libraries."""

    cdef readonly size_t handle

    @staticmethod
    def record(stream):
        from cuda.bindings import driver

        status, event = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
        if status != driver.CUresult.CUDA_SUCCESS:
            raise DeepEPCudaError(f"cuEventCreate failed: {status!r}", 3)
        cdef Event e = Event.__new__(Event)
        e.handle = int(event)
        status, = driver.cuEventRecord(event, driver.CUstream(stream))
        if status != driver.CUresult.CUDA_SUCCESS:
            raise DeepEPCudaError(f"cuEventRecord failed: {status!r}", 3)
        return e

    def wait(self, stream=None):
        _wait_event(stream_handle(stream), self)

    def synchronize(self):
        from cuda.bindings import driver

        status, = driver.cuEventSynchronize(driver.CUevent(self.handle))
        if status != driver.CUresult.CUDA_SUCCESS:
            raise DeepEPCudaError(f"cuEventSynchronize failed: {status!r}", 3)

    def query(self):
        from cuda.bindings import driver

        status, = driver.cuEventQuery(driver.CUevent(self.handle))
        if status == driver.CUresult.CUDA_ERROR_NOT_READY:
            return False
        if status != driver.CUresult.CUDA_SUCCESS:  # a fault: a loop waiting for True would never end
            raise DeepEPCudaError(f"cuEventQuery failed: {status!r}", 3)
        return True

    def __dealloc__(self):
        if self.handle:
            try:
                from cuda.bindings import driver

                driver.cuEventDestroy(driver.CUevent(self.handle))
            except Exception:
                pass


cdef class Handle:
    """The routing of a dispatch, reused by combine and by cached dispatches (same routing, new data).

    Create one up front (``Handle(comm)``) to keep worst-case dispatches capturable in a CUDA graph; otherwise any
    dispatch without one makes one. Freed when garbage-collected or on :meth:`close` (local, not collective).
    """

    cdef deepepHandle_t _h
    cdef readonly object comm
    cdef public object num_recv_rows             # rows of the outputs of dispatches under this routing
    cdef public object num_recv_tokens_per_expert
    cdef public object num_experts

    def __cinit__(self):
        self._h = NULL

    def __init__(self, Communicator comm not None):
        cdef deepepHandle_t h = NULL
        with _InCall(comm, "Handle()"):  # it allocates on the device, which a call of another thread may be using
            _check(deepepHandleCreate(comm._live(), &h))
        self._h = h
        self.comm = comm
        self.num_recv_rows = None
        self.num_recv_tokens_per_expert = []
        self.num_experts = None

    cdef deepepHandle_t _live(self) except NULL:
        if self._h == NULL:
            raise DeepEPInvalidUsage("the handle is closed", 2)
        return self._h

    cdef int64_t _take_recv_counts(self, int num_experts) except -1:
        """Copies the receive counts the library holds on the host (after a notify, or a dispatch that reported
        them) into the handle's Python view of its routing; returns the number of rows."""
        cdef int64_t received = 0
        _check(deepepHandleGetNumRecvTokens(self._h, &received))
        cdef int local_experts = num_experts // self.comm.nranks
        counts = np.zeros(local_experts, np.int32)
        _check(deepepHandleGetRecvTokensPerExpert(self._h, <int32_t*><size_t>counts.ctypes.data, local_experts))
        self.num_experts = num_experts
        self.num_recv_rows = received
        self.num_recv_tokens_per_expert = counts.tolist()  # Python ints; 30 times faster than int() per count
        return received

    @property
    def num_tokens(self):
        """Tokens of this rank the routing covers (None before a dispatch filled the handle)."""
        cdef int64_t n = 0
        if self._h == NULL or deepepHandleGetNumTokens(self._h, &n) != deepepSuccess:
            return None
        return n

    def close(self):
        if self._h != NULL:
            # The running call may be using this handle: it is destroyed only when no call of its communicator runs.
            (<Communicator>self.comm)._check_no_call("Handle.close()", any_thread=True)
            h = self._h
            self._h = NULL
            _check(deepepHandleDestroy(h))

    def __dealloc__(self):
        if self._h != NULL:
            deepepHandleDestroy(self._h)
            self._h = NULL


cdef class _View:
    """A checked 2-D input: pointer, rows, columns, row stride (elements), element kind."""
    cdef public size_t ptr
    cdef public int64_t rows
    cdef public int64_t cols
    cdef public int64_t stride
    cdef public object kind
    cdef public object keep


def _payload_kind(x, view, str name="x"):
    """The payload's element type: a DeviceArray's own bfloat16 / float8, else what its view's dtype says (another
    object's dtype_name is not trusted: its view's element size is what the library reads)."""
    kind = (<DeviceArray>x).dtype_name if isinstance(x, DeviceArray) else None
    return kind if kind in ("bfloat16", "float8_e4m3fn") else payload_kind(view, name)


cdef _View _matrix(obj, stream, str name, dtypes, int device, kind=None, view=None):
    if view is None:
        view = _as_view(obj, stream)
    rows, cols, stride = check_matrix(view, name, dtypes, device)
    cdef _View v = _View()
    v.ptr = view.ptr
    v.rows = rows
    v.cols = cols
    v.stride = stride
    v.kind = kind if kind is not None else dtype_name(view.dtype)
    v.keep = view
    return v


def _integer_or(value, fallback, limit=1 << 63):
    """``value`` as an int where it is an integer in [-limit, limit), else ``fallback``: what the refusal of a call
    assumes of an argument that it may be refusing."""
    try:
        number = operator.index(value)
    except TypeError:
        return fallback
    return number if -limit <= number < limit else fallback


cdef class _OwedCall:
    """The collective high-throughput call this rank still owes the others while a method checks its arguments: if
    the method refuses them before the library has the call, :meth:`refuse` launches this rank's side of it
    (deepepRefuseCall), so that the other ranks finish the same call at once with DeepEPRemoteError instead of
    waiting for this rank until the timeout. ``call`` is None once the library has the call (it refuses on its own
    from there)."""
    cdef object call
    cdef Handle handle
    cdef int num_sms
    cdef object stream  # the stream the call runs on, once known
    # A dispatch proper (not its count exchange) is this rank's part of the sequence of calls: refused or not, it
    # counts as made on every rank, and a combine of it follows on the ranks whose dispatch returned.
    cdef bint dispatch_made
    cdef bint cached  # a cached dispatch: its refusal's combine runs on the handle's block count

    def __init__(self, call, handle, int num_sms):
        self.call = call
        self.handle = handle
        self.num_sms = num_sms
        self.stream = None
        self.dispatch_made = False
        self.cached = False

    cdef void refuse(self, deepepComm_t comm) noexcept:
        if self.call is None or self.stream is None or comm == NULL:
            return
        cdef deepepHandle_t hh = self.handle._h if self.handle is not None else NULL
        cdef deepepCall_t call = self.call
        cdef CUstream_st* cs = <CUstream_st*><size_t>self.stream
        with nogil:
            deepepRefuseCall(comm, call, hh, self.num_sms, cs)  # best effort: the refusal's error is raised


cdef str _dispatch_kind(handle, num_worst_tokens, max_recv_tokens):
    """"exact" (a count exchange first), "cached" (the handle's routing), "bounded" or "worst-case", as a call with
    these arguments makes it. A worst-case count of None or a number <= 0 (of any type, as another rank may pass 0)
    is taken for no worst-case dispatch; one that is no number at all most likely meant one."""
    if max_recv_tokens is not None:
        return "bounded"
    try:
        worst_case = num_worst_tokens is not None and float(num_worst_tokens) > 0
    except (TypeError, ValueError):
        worst_case = True
    if worst_case:
        return "worst-case"
    return "exact" if handle is None else "cached"


cdef _OwedCall _owed_dispatch(Communicator comm, handle, num_worst_tokens, max_recv_tokens, num_sms):
    """The dispatch a call with these arguments owes the other ranks: an exact-size one starts with the count exchange
    (its notify), any other kind (cached, worst-case, bounded) with the dispatch itself, which the library's refusal
    lets the peers finish either way."""
    kind = _dispatch_kind(handle, num_worst_tokens, max_recv_tokens)
    owed = _OwedCall(deepepCallDispatchNotify if kind == "exact" else deepepCallDispatch, comm._own_handle(handle),
                     _integer_or(num_sms, 0, 1 << 31))
    # The peers' bounded dispatch waits for the counts, so a refusal of one raises on every rank (as a refused count
    # exchange does): it counts as made for a combine only once its counts came (_dispatch).
    owed.dispatch_made = kind == "cached" or kind == "worst-case"
    owed.cached = kind == "cached"
    return owed


class RefusedHandle:
    """What a high-throughput dispatch refused on this rank leaves for its combine (``exc.refused_handle``): the
    other ranks' dispatch returned (a cached or worst-case one, an exact-size one refused here after its count
    exchange, a bounded one whose rows overflowed this rank's bound alone) and they make its combine.
    :meth:`Communicator.combine` given it as ``handle`` runs this rank's side of that combine without data (on the
    block count the dispatch asked for, or its cached handle's) and raises DeepEPInvalidUsage, so that the other
    ranks' combine ends at once with DeepEPRemoteError and all stay in step."""

    __slots__ = ("comm", "handle", "num_sms")

    def __init__(self, comm, handle, num_sms):
        self.comm = comm
        self.handle = handle  # the cached dispatch's Handle (its block count), or None: a new routing's
        self.num_sms = num_sms

    def __repr__(self):
        return f"RefusedHandle(rank={self.comm.rank}, num_sms={self.num_sms}, cached={self.handle is not None})"


cdef object _refused_handle(Communicator comm, _OwedCall owed):
    """The RefusedHandle that a dispatch refused on this rank leaves where it counts as made, else None: a refused
    count exchange (an exact-size or a bounded dispatch's) leaves none, since every rank raises there and none
    combines."""
    if not owed.dispatch_made or owed.stream is None or comm.closed:
        return None
    return RefusedHandle(comm, owed.handle if owed.cached else None, owed.num_sms)


def _give_refused_handle(exc, refused):
    """Hands a refused dispatch's RefusedHandle (None: there is none) to the combine its caller makes, as
    ``exc.refused_handle`` of the exception the dispatch raises."""
    if refused is not None:
        try:
            exc.refused_handle = refused
        except AttributeError:  # an exception type without attributes of its own
            pass


cdef _OwedCall _owed_combine(Communicator comm, handle):
    """The combine a call with this ``handle`` owes the other ranks: on the handle's block count, or on that of the
    refused dispatch a RefusedHandle stands for."""
    if isinstance(handle, RefusedHandle) and handle.comm is comm:
        return _OwedCall(deepepCallCombine, handle.handle, handle.num_sms)
    return _OwedCall(deepepCallCombine, comm._own_handle(handle), 0)


def _refuse_high_throughput(Communicator comm, str call, handle, num_worst_tokens, num_sms, stream):
    """This rank's side of a high-throughput ``call`` ("dispatch" or "combine") that a wrapper (the DeepEP adapter)
    refused before pydeepep had it, run on ``stream`` as pydeepep runs its own refusals: the other ranks, already in
    the call, finish it at once with DeepEPRemoteError naming this rank. A dispatch is of the kind its ``handle`` and
    ``num_worst_tokens`` make it (as :meth:`Communicator.dispatch` decides); ``num_sms`` as the call gave it. Returns
    the RefusedHandle that a refused dispatch leaves for its combine, or None."""
    cdef _OwedCall owed
    if call == "dispatch":
        owed = _owed_dispatch(comm, handle, num_worst_tokens, None, num_sms)
    elif call == "combine":
        owed = _owed_combine(comm, handle)
    else:
        raise ValueError(f"call is {call!r}; it must be 'dispatch' or 'combine'")
    owed.stream = stream_handle(stream)
    with _InCall(comm, f"refusing a {call}"):
        owed.refuse(comm._live())
    return _refused_handle(comm, owed)


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
    cdef readonly bint zero_copy_dispatch
    cdef size_t _dispatch_area  # its device address (0: none), where high-throughput dispatches receive their rows
    cdef object _async_stream  # cuda.core Stream of async_finish calls, never destroyed (see _describe)
    cdef object _ll  # low-latency buffer-set bookkeeping (_lowlatency.pxi)
    # The stream the last collective call ran on, and its object (kept alive): where a call whose own stream cannot be
    # read runs its refusal, after this rank's earlier calls (the communicator's stream before any call).
    cdef size_t _last_stream
    cdef object _last_stream_owner
    # The thread inside a call of this communicator, and how deep (_InCall): calls of one communicator must not
    # overlap, and one from another thread meanwhile is refused instead of racing it (close() freeing what it uses).
    cdef unsigned long _call_thread
    cdef int _call_depth

    def __cinit__(self):
        self._comm = NULL

    def __init__(self, bytes unique_id, rank, nranks, *, device=None, double timeout=100.0,
                 buffer_bytes=0, max_tokens_per_rank=4096, hidden=7168, num_topk=8, num_experts=256,
                 allow_nvlink_multicast=False, low_latency_max_tokens=0, low_latency_transport="auto",
                 zero_copy_dispatch=False):
        if len(unique_id) != DEEPEP_UNIQUE_ID_BYTES:
            raise DeepEPInvalidArgument(
                f"unique_id has {len(unique_id)} bytes; it must be the {DEEPEP_UNIQUE_ID_BYTES} bytes that "
                "get_unique_id() returns", 1)
        cdef int rank_ = _c_int("rank", rank)
        cdef int nranks_ = _c_int("nranks", nranks)
        cdef deepepConfig config = _make_config(device, timeout, buffer_bytes, max_tokens_per_rank, hidden,
                                                num_topk, num_experts, allow_nvlink_multicast,
                                                low_latency_max_tokens, low_latency_transport, zero_copy_dispatch)
        cdef deepepUniqueId uid
        memcpy(uid.internal, <const char*>unique_id, DEEPEP_UNIQUE_ID_BYTES)
        if device is not None:
            # Make the device's primary context current for this thread, so arrays allocated here land on it.
            _device(device)
        cdef deepepComm_t comm = NULL
        cdef deepepResult_t status
        with nogil:
            status = deepepCommInitRank(&comm, nranks_, &uid, rank_, &config)
        _check(status)
        self._comm = comm
        try:
            self._describe(comm)
        except BaseException:
            # The caller never gets this object to close(): destroy here (collective: the other ranks' close()
            # meets it, or it ends at the timeout), so that the ranks' teardown is not left waiting for this one.
            self._comm = NULL
            with nogil:
                deepepCommDestroy(comm)
            raise

    cdef _describe(self, deepepComm_t comm):
        """The attributes read from a new communicator, and its stream for async_finish calls."""
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
        cdef void* area = NULL
        _check(deepepCommGetDispatchArea(comm, &area, &nbytes))
        self._dispatch_area = <size_t>area
        self.zero_copy_dispatch = area != NULL
        # The stream of async_finish calls is owned here rather than by the library, so that outputs made on it
        # can be freed on it after close(). It is never destroyed (one stream per communicator, for the process):
        # handed out as an integer (``stream``), it may be used after the communicator is gone, with nothing to keep
        # it alive. PyTorch's allocator does so: it records an event on every stream a tensor was recorded on
        # (Tensor.record_stream, as the torch adapter's async calls do) when the tensor's memory is freed, and a
        # destroyed stream there crashed the process.
        self._async_stream = _device(self.device).create_stream()
        Py_INCREF(self._async_stream)
        self._last_stream, self._last_stream_owner = int(self._async_stream.handle), self._async_stream

    cdef deepepComm_t _live(self) except NULL:
        if self._comm == NULL:
            raise DeepEPInvalidUsage("the communicator is closed", 2)
        return self._comm

    cdef _check_no_call(self, str what, bint any_thread=False):
        """Refuses `what` while another thread is inside a call of this communicator (or, with `any_thread`, while
        any call is: what frees the communicator or a handle must not run from a callback of a call either)."""
        if self._call_depth == 0:
            return
        if self._call_thread != PyThread_get_thread_ident():
            raise DeepEPInvalidUsage(
                f"{what}: another thread is inside a call of this communicator; its calls must not overlap (make them "
                "from one thread, or one at a time)", 2)
        if any_thread:
            raise DeepEPInvalidUsage(
                f"{what}: a call of this communicator is still running (this is a callback of it, such as an out= "
                "allocator); make it after that call returns", 2)

    @property
    def closed(self):
        return self._comm == NULL

    @property
    def stream(self):
        """The communicator's own stream (where ``async_finish`` calls run), as an integer handle. A handle read
        before ``close()`` stays valid for the process (work recorded on it, PyTorch's record_stream say, may outlive
        the communicator)."""
        self._live()
        return int(self._async_stream.handle)

    def __cuda_stream__(self):
        """The communicator's own stream, in the CUDA stream protocol: a Communicator can be passed as a stream."""
        return (0, self.stream)

    def close(self):
        """Destroys the communicator (collective: every rank calls it). Calling it again does nothing. Arrays that
        calls returned stay valid, but for a zero-copy dispatch's ``recv_x``, a view of the communicator's buffer,
        which goes with it; the communicator's stream lives on for the process. Waits for calls still running on
        their streams (it synchronises the device: do not close during a CUDA graph capture on that device, which
        the wait would conflict with), then at most the timeout for the other ranks: if one never comes, frees this
        rank's resources and raises :class:`DeepEPTimeoutError` (unless a call already reported a timeout or a rank
        is masked out of low-latency calls); the process should then exit."""
        if self._comm == NULL:
            return
        self._check_no_call("close()", any_thread=True)
        cdef deepepComm_t comm = self._comm
        cdef deepepResult_t status
        self._comm = NULL
        try:
            # The destroy waits for the device, async_finish calls included, but only for its own stream while a
            # graph is being captured on the device: those calls use the buffer that it frees.
            self._async_stream.sync()
        except Exception:
            pass  # a fault there is the calls' to report (check_async_error); the collective destroy must still run
        finally:  # even on KeyboardInterrupt: the peers wait for this rank's destroy
            with nogil:
                status = deepepCommDestroy(comm)
            # Receive hooks still due can never run now: the book no longer keeps them, and their arrays, alive.
            self._ll = None
            _release_done_holds()  # the destroy waited for the device: the calls' holds are done
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

    def _own_handle(self, handle):
        """`handle` where it is one of this communicator's, else None (what a refusal can name: the library refuses
        any other, and the refusal would not run)."""
        return handle if isinstance(handle, Handle) and handle.comm is self else None

    def _call_stream(self, stream):
        """The raw handle of a collective call's ``stream``, remembered as the last call's. A stream that cannot be
        read raises, with the stream a refusal of the call runs on (``_last_stream``) unchanged."""
        handle = stream_handle(stream)
        self._last_stream, self._last_stream_owner = handle, stream
        return handle

    def _start(self, stream, previous_event, bint async_finish, _OwedCall owed=None):
        """The stream a call runs on (and its owner object): the caller's, or with ``async_finish`` the
        communicator's, ordered after the caller's work; both wait for ``previous_event`` when given. ``owed`` learns
        the stream first, so that a refusal from here on reaches the other ranks (where ``stream`` cannot be read, on
        the stream of this rank's last call)."""
        if owed is not None:
            owed.stream = self._last_stream
        caller = self._call_stream(stream)
        run_on, owner = (self.stream, self._async_stream) if async_finish else (caller, stream)
        if async_finish:
            self._last_stream, self._last_stream_owner = run_on, owner
        if run_on != caller:
            _make_stream_wait(caller, run_on)
        if previous_event is not None:
            _wait_event(run_on, previous_event)
        if owed is not None:
            # Only once the waits are in place: a refusal before that runs after this rank's last call, not on
            # run_on, where it could overtake the work previous_event was to order the call after.
            owed.stream = run_on
        return owner, run_on

    def _after_raise(self, _OwedCall owed, inputs, caller, size_t run_on, bint async_finish):
        """After a collective call raised: this rank's side of it (the library's call, or the refusal run here) may be
        on another stream than the caller's (the communicator's with ``async_finish``, or the last call's), and no
        event comes back to order the next call after it. So the caller's stream waits for it, and an ``async_finish``
        call's inputs are kept until it is done. Best effort: the call's own error is the one raised."""
        try:
            left_on = owed.stream if owed.call is not None else run_on  # None: nothing was launched
            if left_on is None:
                return
            if async_finish:
                self._keep_for_async(inputs, caller, ())
            target = stream_handle(caller)
            if left_on != target:
                _make_stream_wait(left_on, target)
        except Exception:
            pass

    def _keep_for_async(self, inputs, caller, outputs):
        """An ``async_finish`` call reads its inputs on the communicator's stream, and the caller reads its outputs
        on ``caller`` once it waited for the event: pydeepep memory among them is reused only after that work, as if
        the inputs had been made on the communicator's stream and the outputs on the caller's."""
        for array in inputs:
            if isinstance(array, DeviceArray):
                array.record_stream(self._async_stream)
        for array in outputs:
            if isinstance(array, DeviceArray):
                array.record_stream(caller)

    def measure_push_bandwidth(self, num_sms, nbytes=256 << 20, iterations=10, stream=None):
        """Diagnostic: GB/s of SM-driven 16-byte stores into the next rank's buffer with ``num_sms`` blocks (median
        of ``iterations`` passes). Every rank calls it at the same time, with no dispatch or combine in flight on any
        rank (it overwrites the peers' receive regions)."""
        cdef int sms = _c_int("num_sms", num_sms)
        cdef size_t size = _c_int("nbytes", nbytes, 0, 2**64 - 1)
        cdef int passes = _c_int("iterations", iterations)
        cdef deepepComm_t comm
        cdef size_t s
        cdef double gbps = 0
        cdef deepepResult_t status
        with _InCall(self, "measure_push_bandwidth"):
            comm = self._live()
            s = stream_handle(stream)
            with nogil:
                status = deepepCommMeasurePushBandwidth(comm, sms, size, passes, &gbps, <CUstream_st*>s)
        _check(status)
        return gbps

    def measure_flag_round(self, iterations=20, stream=None):
        """Diagnostic: microseconds per low-latency kernel that moves nothing and only exchanges one round of
        per-block flags with every peer (the fixed cost every low-latency call pays), ``iterations`` back to back,
        median of 5 passes. Every rank calls it at the same time; needs a low-latency area, every rank over
        NVLink and none masked."""
        cdef int passes = _c_int("iterations", iterations)
        cdef deepepComm_t comm
        cdef size_t s
        cdef double us = 0
        cdef deepepResult_t status
        with _InCall(self, "measure_flag_round"):
            comm = self._live()
            s = stream_handle(stream)
            with nogil:
                status = deepepCommMeasureFlagRound(comm, passes, &us, <CUstream_st*>s)
        _check(status)
        return us

    def low_latency_mask_rank(self, rank, bint masked=True):
        """Masks ``rank`` out of low-latency calls (or takes it back with ``masked=False``): it is never waited for or
        written to, and this rank's tokens routed to its experts are skipped like -1 slots. A low-latency call that
        times out waiting for a rank masks it by itself; after ``clear_async_error()`` the survivors go on among
        themselves. Every surviving rank must mask the same ranks. The combine of a dispatch sent while a rank was
        masked leaves it out, also when it was taken back in between. Blocking (synchronises the device)."""
        cdef int peer = _c_int("rank", rank)
        cdef deepepComm_t comm
        cdef deepepResult_t status
        with _InCall(self, "low_latency_mask_rank"):
            comm = self._live()
            with nogil:
                status = deepepCommLowLatencyMaskRank(comm, peer, 1 if masked else 0)
        _check(status)

    def low_latency_masked_ranks(self):
        """A list of ``nranks`` booleans: which ranks this rank has masked out of low-latency calls."""
        cdef deepepComm_t comm
        flags = np.zeros(self.nranks, np.intc)
        cdef int[::1] view = flags
        cdef deepepResult_t status
        with _InCall(self, "low_latency_masked_ranks"):
            comm = self._live()
            with nogil:
                status = deepepCommLowLatencyMaskedRanks(comm, &view[0])
        _check(status)
        return [bool(v) for v in flags]

    def low_latency_timeline(self):
        """Diagnostic (needs DEEPEP_LL_TIMELINE=1 when the communicator was created): int64 [blocks, 8] of the
        %globaltimer nanoseconds at which each block of the last low-latency kernel reached: start, peers'
        acknowledgements seen, (dispatch) the tokens' expert ids sent, rows stored, flags published, peers' flags
        seen, outputs written, end (0: not reached). Synchronise with the kernel first."""
        marks = np.zeros((1024, 8), np.int64)  # one row per block; GPUs have fewer SMs
        cdef int64_t[:, ::1] view = marks
        cdef int blocks = 0
        with _InCall(self, "low_latency_timeline"):
            _check(deepepCommLowLatencyTimeline(self._live(), &view[0, 0], <int>marks.shape[0], &blocks))
        return marks[:blocks]

    def check_async_error(self):
        """Raises the error a stream-ordered call recorded on the device (a timeout, an out-of-range expert id), if
        any. Does not wait for the stream: synchronise first to see faults of work still in flight."""
        cdef deepepResult_t found = deepepSuccess
        with _InCall(self, "check_async_error"):  # a running call may be recording or reading the error
            _check(deepepCommGetAsyncError(self._live(), &found))
        if found != deepepSuccess:
            _check(found)

    def clear_async_error(self):
        with _InCall(self, "clear_async_error"):  # would wipe what a running call has just recorded
            _check(deepepCommClearAsyncError(self._live()))

    def get_dispatch_layout(self, topk_idx, num_experts, stream=None, out=None):
        """Per-rank and per-expert token counts and the token-to-rank mask of a routing decision.

        ``topk_idx``: [N, K] int64 or int32 device array (rows may be strided), entries in [-1, num_experts).
        Returns ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)``
        as DeviceArrays produced on ``stream``, or writes into ``out``, a tuple of three contiguous device arrays of
        those shapes and dtypes (uint8 accepted for the mask), and returns it. Stream-ordered; no host
        synchronisation; capturable in a CUDA graph.
        """
        cdef deepepComm_t comm = NULL
        cdef size_t s = stream_handle(stream)
        cdef deepepDataType_t index_type
        cdef size_t topk_ptr, rank_ptr, expert_ptr, mask_ptr
        cdef int64_t n, stride
        cdef int k
        cdef int experts = _c_int("num_experts", num_experts)
        cdef deepepResult_t status
        with _InCall(self, "get_dispatch_layout"):
            comm = self._live()  # inside the guard: a close() from another thread before it is refused
            view = _as_view(topk_idx, s)
            num_tokens, num_topk, row_stride = check_matrix(view, "topk_idx", (np.int64, np.int32), self.device)
            if experts <= 0 or experts % self.nranks != 0:
                raise DeepEPInvalidArgument(
                    f"num_experts is {experts}; it must be a positive multiple of the number of ranks "
                    f"({self.nranks})", 1)
            if out is None:
                # Pass the caller's stream object itself: the arrays keep it alive until their memory is freed on it.
                results = tuple(_empty_group((((self.nranks,), np.int32), ((experts,), np.int32),
                                              ((num_tokens, self.nranks), np.bool_)), self.device, stream))
                pointers = [a.ptr for a in results]
            else:
                if len(out) != 3:
                    raise DeepEPInvalidArgument("out must be a tuple of 3 arrays", 1)
                results = tuple(out)
                pointers = [
                    _out_pointer(results[0], stream, "num_tokens_per_rank", (self.nranks,), (np.int32,), self.device),
                    _out_pointer(results[1], stream, "num_tokens_per_expert", (experts,), (np.int32,), self.device),
                    _out_pointer(results[2], stream, "is_token_in_rank", (num_tokens, self.nranks),
                                 (np.bool_, np.uint8),
                                 self.device),
                ]
            index_type = deepepInt64 if np.dtype(view.dtype) == np.int64 else deepepInt32
            topk_ptr, rank_ptr, expert_ptr, mask_ptr = view.ptr, pointers[0], pointers[1], pointers[2]
            n, k, stride = num_tokens, num_topk, row_stride
            with nogil:
                status = deepepGetDispatchLayout(comm, <const void*>topk_ptr, index_type, n, k, stride, experts,
                                                 <int32_t*>rank_ptr, <int32_t*>expert_ptr, <uint8_t*>mask_ptr,
                                                 <CUstream_st*>s)
            _check(status)
            return results

    def dispatch(self, x, *, topk_idx=None, topk_weights=None, num_experts=None, x_scales=None, handle=None,
                 expert_alignment=1, num_worst_tokens=0, max_recv_tokens=None, num_sms=0, stream=None, out=None,
                 previous_event=None, async_finish=False):
        """High-throughput dispatch: sends each token to every rank holding one of its experts (once per rank).

        ``x`` [N, H]: bfloat16 (or its bits as uint16) or float8_e4m3fn (or uint8) with ``x_scales`` [N, H/128]
        float32 or UE8M0-packed int32 [N, ceil(H/512)]; rows may be strided. ``topk_idx`` [N, K] int64/int32 and
        ``num_experts`` give the routing (exact-size and worst-case modes); ``topk_weights`` [N, K] float32 travel
        with the tokens. Modes: no ``handle`` and ``num_worst_tokens == 0``: exact size (a count exchange and one host
        synchronisation); ``handle`` given and ``num_worst_tokens == 0``: cached (same routing, new data, no host
        synchronisation); ``num_worst_tokens > 0``: outputs of that many rows, no host synchronisation (``handle``,
        if given, is refilled: create it beforehand to capture the call in a CUDA graph); ``max_recv_tokens`` given
        (a bound on the rows this rank receives, at least 1; ``nranks * max_tokens_per_rank`` always holds, and
        every rank must choose this mode): exact-size results like the first mode, but the counts are exchanged
        inside the dispatch kernel, which writes into outputs of ``max_recv_tokens`` rows, and the call returns as
        soon as the counts are known, while the rows still move (no second kernel, no idle GPU); the arrays returned
        are the first rows of those outputs and keep all of their memory until freed; more rows than the bound raise
        ``DeepEPBufferTooSmall``; ``handle``, if given, is refilled. Returns a
        :data:`DispatchResult`; outputs are produced on ``stream``. ``out``: a DispatchResult of an earlier call
        with the same shapes whose arrays are written again instead of new ones (needed inside CUDA graphs), or a
        callable that takes the number of rows this rank receives and returns an object with the DispatchResult's
        array fields, to write (an allocator of the caller's, such as the PyTorch adapter's).
        ``previous_event``: work waits for this event first. ``async_finish``: run on the communicator's stream
        (after the work already on ``stream``) and return with ``result.event`` to wait on; the outputs are then
        produced on the communicator's stream. On a communicator made with ``zero_copy_dispatch=True``, ``recv_x``
        is a view of its dispatch area, which the peers write directly: every dispatch's ``recv_x`` is that same
        memory, valid until this rank's next dispatch starts on the device (copy what must live longer). A dispatch
        refused on this rank (after its count exchange, if any) raises with ``exc.refused_handle``: the other ranks'
        dispatch may have returned, so pass it to the combine they make of it (see :meth:`combine`).
        """
        # The scalar arguments are converted (integers only) once the stream is known, so that a wrong type on one
        # rank is refused like any other bad argument, on every rank.
        cdef _OwedCall owed = _owed_dispatch(self, handle, num_worst_tokens, max_recv_tokens, num_sms)
        caller = stream
        inputs = (x, x_scales, topk_idx, topk_weights)
        cdef size_t s = 0
        with _InCall(self, "dispatch"):
            try:
                stream, s = self._start(stream, previous_event, async_finish, owed)
                result = self._dispatch(owed, stream, s, x, topk_idx, topk_weights, num_experts, x_scales, handle,
                                        _c_int("expert_alignment", expert_alignment),
                                        operator.index(num_worst_tokens),
                                        max_recv_tokens, _c_int("num_sms", num_sms), out, async_finish)
            except BaseException as exc:
                owed.refuse(self._comm)
                self._after_raise(owed, inputs, caller, s, async_finish)
                _give_refused_handle(exc, _refused_handle(self, owed))
                raise
        if async_finish:
            self._keep_for_async(inputs, caller,
                                 (result.recv_x, result.recv_scales, result.recv_topk_idx, result.recv_topk_weights,
                                  result.recv_src_idx))
        return result

    def _dispatch(self, _OwedCall owed, stream, size_t s, x, topk_idx, topk_weights, num_experts, x_scales, handle,
                  int expert_alignment, int64_t num_worst_tokens, max_recv_tokens, int num_sms, out,
                  bint async_finish):
        cdef deepepComm_t comm = self._live()
        cdef CUstream_st* cs = <CUstream_st*>s
        cdef deepepDispatchArgs a
        _check(deepepDispatchArgsInit(&a, sizeof(a)))
        view = _as_view(x, s)
        kind = _payload_kind(x, view)
        cdef _View xv = _matrix(x, s, "x", None, self.device, kind, view)
        fp8 = kind == "float8_e4m3fn"
        a.num_tokens = xv.rows
        a.x = <const void*><size_t>xv.ptr
        a.x_type = deepepFloat8E4M3 if fp8 else deepepBFloat16
        a.hidden = <int>xv.cols
        a.x_row_stride = xv.stride
        cdef _View sv
        scales_dtype = None
        if fp8:
            if x_scales is None:
                raise DeepEPInvalidArgument("x is FP8 but x_scales is missing", 1)
            sv = _matrix(x_scales, s, "x_scales", (np.float32, np.int32), self.device)
            if sv.rows != xv.rows:
                raise DeepEPInvalidArgument(f"x_scales has {sv.rows} rows but x has {xv.rows}", 1)
            scales_dtype = np.float32 if sv.kind == "float32" else np.int32
            a.x_scales = <const void*><size_t>sv.ptr
            a.scales_type = deepepFloat32 if sv.kind == "float32" else deepepInt32
            a.num_scales = <int>sv.cols
            a.scales_row_stride = sv.stride
        elif x_scales is not None:
            raise DeepEPInvalidArgument("x_scales are given but x is BF16", 1)
        cdef _View tv
        num_topk = 0
        if topk_idx is not None:
            tv = _matrix(topk_idx, s, "topk_idx", (np.int64, np.int32), self.device)
            if tv.rows != xv.rows:
                raise DeepEPInvalidArgument(f"topk_idx has {tv.rows} rows but x has {xv.rows}", 1)
            num_topk = tv.cols
            a.topk_idx = <const void*><size_t>tv.ptr
            a.topk_type = deepepInt64 if tv.kind == "int64" else deepepInt32
            a.num_topk = <int>tv.cols
            a.topk_row_stride = tv.stride
        cdef _View wv
        if topk_weights is not None:
            if topk_idx is None:
                raise DeepEPInvalidArgument("topk_weights are given without topk_idx", 1)
            wv = _matrix(topk_weights, s, "topk_weights", (np.float32,), self.device, None)
            if wv.rows != xv.rows or wv.cols != num_topk:
                raise DeepEPInvalidArgument(f"topk_weights has shape {(wv.rows, wv.cols)}; {(xv.rows, num_topk)} "
                                            "is needed", 1)
            a.topk_weights = <const float*><size_t>wv.ptr
            a.weights_row_stride = wv.stride
        bounded = max_recv_tokens is not None
        if bounded:
            max_recv_tokens = operator.index(max_recv_tokens)  # a count: an integer, never a truncated float
        if bounded and max_recv_tokens < 1:
            # 0 must not quietly mean another mode: the other ranks would run a different collective.
            raise DeepEPInvalidArgument(f"max_recv_tokens is {max_recv_tokens}; a bound must be at least 1", 1)
        if bounded and num_worst_tokens > 0:
            raise DeepEPInvalidArgument("num_worst_tokens and max_recv_tokens are two modes: pass one of them", 1)
        if bounded and out is not None:
            raise DeepEPInvalidArgument("a dispatch with max_recv_tokens returns views of new outputs: out= is for "
                                        "cached and worst-case dispatches", 1)
        a.expert_alignment = expert_alignment
        a.num_worst_tokens = max_recv_tokens if bounded else num_worst_tokens
        a.report_recv_counts = bounded
        a.num_sms = num_sms
        cdef Handle h
        cdef deepepResult_t status
        routing_given = handle is None or num_worst_tokens > 0 or bounded
        if routing_given:
            if topk_idx is None or num_experts is None:
                raise DeepEPInvalidArgument("a dispatch without a handle needs topk_idx and num_experts", 1)
            a.num_experts = _c_int("num_experts", num_experts)
        if isinstance(handle, RefusedHandle):
            raise DeepEPInvalidUsage("the handle is that of a dispatch refused on this rank (exc.refused_handle): it "
                                     "holds no routing; pass it to that dispatch's combine only", 2)
        if handle is None:
            h = Handle(self)
        else:
            h = handle
            if h.comm is not self:
                raise DeepEPInvalidUsage("the handle belongs to another communicator", 2)
        cdef deepepHandle_t hh = h._live()
        cdef int64_t rows
        cdef int64_t received = 0
        if num_worst_tokens > 0 or bounded:
            rows = a.num_worst_tokens
        elif handle is None:
            owed.call = None  # the library has the call: it refuses on its own from here
            with nogil:
                status = deepepDispatchNotify(comm, &a, hh, cs)
            _check(status)
            owed.call, owed.handle = deepepCallDispatch, h  # the dispatch that goes with the counts
            owed.dispatch_made = True
            rows = h._take_recv_counts(num_experts)
        else:
            if h.num_recv_rows is None:
                raise DeepEPInvalidUsage("the handle holds no routing yet", 2)
            rows = h.num_recv_rows
        if callable(out):
            out = out(rows)  # the caller's allocator, for a size the count exchange may have just decided
        if out is None:
            if self._dispatch_area:
                # Zero-copy: the rows land in the communicator's dispatch area, which recv_x views (the library
                # checks that they fit).
                recv_x = DeviceArray(self._dispatch_area, (rows, xv.cols), kind, self.device, stream, self)
            else:
                recv_x = empty((rows, xv.cols), kind, device=self.device, stream=stream)
            recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx = _empty_group((
                ((rows, a.num_scales), scales_dtype) if fp8 else None,
                ((rows, num_topk), np.int64) if topk_idx is not None else None,
                ((rows, num_topk), np.float32) if topk_weights is not None else None,
                ((rows,), np.int32)), self.device, stream)
        else:
            # The library cannot see the sizes of caller arrays: check every one against what will be written.
            recv_x = _expect(out.recv_x, (rows, xv.cols), np.uint8 if fp8 else np.uint16, "recv_x", stream,
                             self.device)
            if self._dispatch_area and recv_x.ptr != self._dispatch_area:
                raise DeepEPInvalidArgument("out.recv_x is not the dispatch area of this zero-copy communicator: pass "
                                            "a DispatchResult of one of its dispatches", 1)
            recv_scales = _expect(out.recv_scales, (rows, a.num_scales) if fp8 else None, scales_dtype, "recv_scales",
                                  stream, self.device)
            recv_topk_idx = _expect(out.recv_topk_idx, (rows, num_topk) if topk_idx is not None else None, np.int64,
                                    "recv_topk_idx", stream, self.device)
            recv_topk_weights = _expect(out.recv_topk_weights,
                                        (rows, num_topk) if topk_weights is not None else None, np.float32,
                                        "recv_topk_weights", stream, self.device)
            recv_src_idx = _expect(out.recv_src_idx, (rows,), np.int32, "recv_src_idx", stream, self.device)
        a.recv_x = <void*><size_t>recv_x.ptr
        a.recv_scales = <void*><size_t>(recv_scales.ptr if fp8 else 0)
        a.recv_topk_idx = <int64_t*><size_t>(recv_topk_idx.ptr if recv_topk_idx is not None else 0)
        a.recv_topk_weights = <float*><size_t>(recv_topk_weights.ptr if recv_topk_weights is not None else 0)
        a.recv_src_idx = <int32_t*><size_t>recv_src_idx.ptr
        a.num_recv_rows = rows
        owed.call = None
        with nogil:
            status = deepepDispatch(comm, &a, hh, cs)
        _check(status)
        # The handle's Python view of its routing changes only once the library accepted the call.
        if bounded:
            # Until the counts are in: a failed wait leaves no Python view of a routing for later calls to use.
            h.num_recv_rows = h.num_experts = None
            h.num_recv_tokens_per_expert = []
            with nogil:
                status = deepepHandleWaitRecvCounts(hh)
            # Once the counts came the peers have their results and will combine, also where this rank's rows overflow
            # its bound: the wait's own deepepBufferTooSmall, which, unlike a fault recorded on the device (a peer's
            # refusal, an earlier call's overflow), is no "asynchronous error" (validation.cpp, read_async_error).
            owed.dispatch_made = status == deepepSuccess
            try:
                _check(status)
            except DeepEPBufferTooSmall as exc:
                owed.dispatch_made = "asynchronous error" not in str(exc)
                raise
            received = h._take_recv_counts(num_experts)
            recv_x = _leading_rows(recv_x, received)
            recv_scales = _leading_rows(recv_scales, received)
            recv_topk_idx = _leading_rows(recv_topk_idx, received)
            recv_topk_weights = _leading_rows(recv_topk_weights, received)
            recv_src_idx = _leading_rows(recv_src_idx, received)
        elif num_worst_tokens > 0:
            h.num_experts = num_experts
            h.num_recv_rows = rows
            h.num_recv_tokens_per_expert = []
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights,
                              list(h.num_recv_tokens_per_expert), recv_src_idx, h,
                              Event.record(s) if async_finish else None)

    def combine(self, x, handle, *, topk_weights=None, bias=None, stream=None, out=None, previous_event=None,
                async_finish=False):
        """High-throughput combine: returns to each source the sum, over the ranks that received each of its tokens
        (ascending), of their rows of ``x`` [rows, H] bfloat16 (bits as uint16 accepted) in the handle's receive
        order, plus up to two ``bias`` arrays [N, H] (one array or a tuple), all in float32, rounded once to
        bfloat16. ``topk_weights`` [rows, K] float32 are summed the same way. Returns a :data:`CombineResult`
        ``(out [N, H] bfloat16, topk_weights [N, K] float32 or None, event)`` produced on ``stream``; no host
        synchronisation. ``out``: the result of an earlier combine, whose arrays are written again instead of new ones
        (needed inside CUDA graphs), or an allocator called with the row count N that returns such a pair.
        ``previous_event`` and ``async_finish`` as in :meth:`dispatch`. ``handle`` may be the ``refused_handle`` of a
        dispatch refused on this rank: the call then runs this rank's side of the combine without data and raises,
        so that the other ranks' combine of that dispatch ends at once."""
        cdef _OwedCall owed = _owed_combine(self, handle)
        refused = isinstance(handle, RefusedHandle)
        caller = stream
        inputs = (x, topk_weights, *(tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)))
        cdef size_t s = 0
        with _InCall(self, "combine"):
            try:
                stream, s = self._start(stream, previous_event, async_finish, owed)
                if refused and handle.comm is not self:
                    raise DeepEPInvalidUsage("the handle belongs to another communicator", 2)
                if refused:
                    self._live()  # a closed communicator says so (nothing runs then)
                    raise DeepEPInvalidUsage(
                        "combine refused: the handle is that of a dispatch refused on this rank (exc.refused_handle); "
                        "this rank's side of the combine ran without data, so that the other ranks' combine ends", 2)
                result = self._combine(owed, stream, s, x, handle, topk_weights, bias, out, async_finish)
            except BaseException:
                owed.refuse(self._comm)
                self._after_raise(owed, inputs, caller, s, async_finish)
                raise
        if async_finish:
            self._keep_for_async(inputs, caller, (result.out, result.topk_weights))
        return result

    def _combine(self, _OwedCall owed, stream, size_t s, x, Handle handle not None, topk_weights, bias, out,
                 bint async_finish):
        cdef deepepComm_t comm = self._live()
        cdef CUstream_st* cs = <CUstream_st*>s
        cdef deepepHandle_t hh = handle._live()
        if handle.comm is not self:
            raise DeepEPInvalidUsage("the handle belongs to another communicator", 2)
        cdef deepepCombineArgs a
        _check(deepepCombineArgsInit(&a, sizeof(a)))
        view = _as_view(x, s)
        kind = _payload_kind(x, view)
        if kind != "bfloat16":
            raise DeepEPInvalidArgument(f"combine takes bfloat16 rows; x is {kind}", 1)
        cdef _View xv = _matrix(x, s, "x", None, self.device, kind, view)
        a.x = <const void*><size_t>xv.ptr
        a.hidden = <int>xv.cols
        a.num_rows = xv.rows
        a.x_row_stride = xv.stride
        cdef _View wv
        num_topk = 0
        if topk_weights is not None:
            wv = _matrix(topk_weights, s, "topk_weights", (np.float32,), self.device)
            if wv.rows != xv.rows:
                raise DeepEPInvalidArgument(f"topk_weights has {wv.rows} rows but x has {xv.rows}", 1)
            num_topk = wv.cols
            a.topk_weights = <const float*><size_t>wv.ptr
            a.num_topk = <int>wv.cols
            a.weights_row_stride = wv.stride
        biases = () if bias is None else (tuple(bias) if isinstance(bias, (tuple, list)) else (bias,))
        if len(biases) > 2:
            raise DeepEPInvalidArgument(f"at most two bias arrays are supported, got {len(biases)}", 1)
        cdef _View bv
        keep = []
        cdef int64_t n = 0
        _check(deepepHandleGetNumTokens(hh, &n))
        for i, b in enumerate(biases):
            view = _as_view(b, s)
            kind = _payload_kind(b, view, f"bias[{i}]")
            if kind != "bfloat16":  # the kernel reads bias rows as bfloat16
                raise DeepEPInvalidArgument(f"bias[{i}] is {kind}; it must be bfloat16 (or its bits as uint16)", 1)
            bv = _matrix(b, s, f"bias[{i}]", None, self.device, kind, view)
            if bv.rows != n or bv.cols != xv.cols:
                raise DeepEPInvalidArgument(f"bias[{i}] has shape {(bv.rows, bv.cols)}; {(n, xv.cols)} is needed", 1)
            a.bias[i] = <const void*><size_t>bv.ptr
            a.bias_row_stride[i] = bv.stride
            keep.append(bv)
        if callable(out):
            out = out(n)  # the caller's allocator, called inside the call so that a failure is refused to the peers
        if out is None:
            out_x = empty((n, xv.cols), "bfloat16", device=self.device, stream=stream)
            out_weights = empty((n, num_topk), np.float32, device=self.device, stream=stream) if num_topk else None
        else:
            out_x = _expect(out[0], (n, xv.cols), np.uint16, "out", stream, self.device)
            out_weights = _expect(out[1], (n, num_topk) if num_topk else None, np.float32, "out topk_weights",
                                  stream, self.device)
        a.out = <void*><size_t>out_x.ptr
        a.out_topk_weights = <float*><size_t>(out_weights.ptr if out_weights is not None else 0)
        cdef deepepResult_t status
        owed.call = None
        with nogil:
            status = deepepCombine(comm, &a, hh, cs)
        _check(status)
        return CombineResult(out_x, out_weights, Event.record(s) if async_finish else None)

    def low_latency_dispatch(self, x, topk_idx, num_experts, *, bint use_fp8=True, bint round_scale=False,
                             bint use_ue8m0=False, bint return_recv_hook=False, stream=None, out=None,
                             stats_recv_count=None, stats_wait_ns=None, bint scales_token_contiguous=False):
        """Low-latency dispatch (decoding): every valid (token, expert) pair goes to the expert's rank.

        ``x`` [N, H] bfloat16 (bits as uint16 accepted), N <= ``low_latency_max_tokens``; ``topk_idx`` [N, K]
        int64/int32 in [-1, num_experts). Outputs per local expert [E_loc, R*T, H]: FP8 cast in the kernel
        (``use_fp8``; scales float32, powers of two with ``round_scale``, UE8M0-packed int32 with ``use_ue8m0``) or
        bfloat16. Returns a :class:`LowLatencyDispatchResult` (also the handle of the combine), produced on
        ``stream`` with no host synchronisation (capturable). ``return_recv_hook``: only send; ``result.hook()``
        receives later. ``out``: an earlier result of the same shapes (or any object with its five array
        attributes) whose arrays are written again (the combine of a result whose routing arrays were written
        again runs without data and raises); arrays a due receive hook writes are refused. Dispatches alternate
        between two buffer sets: a result stays valid until the dispatch after next.

        ``scales_token_contiguous``: the scales are stored [E_loc, columns, R*T] (row index fastest) instead of
        [E_loc, R*T, columns].

        Load statistics (optional, cumulative: the receive adds to them, the caller zeroes them):
        ``stats_recv_count`` int64 or int32 [E_loc] gains the rows each local expert received; ``stats_wait_ns``
        int64 [R] gains the nanoseconds the receive waited for each source rank's tokens."""
        with _InCall(self, "low_latency_dispatch"):
            return _low_latency_dispatch(self, x, topk_idx, num_experts, use_fp8, round_scale, use_ue8m0,
                                         return_recv_hook, stream, out, stats_recv_count, stats_wait_ns,
                                         scales_token_contiguous)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, *, bint zero_copy=False,
                            bint return_recv_hook=False, stream=None, out=None, stats_wait_ns=None):
        """Low-latency combine: ``out[t] = bf16(sum over k ascending, topk_idx[t, k] != -1, of topk_weights[t, k]
        * y)`` with y the expert output of (t, k) (float32 products and sums, no fused multiply-add).

        ``x`` [E_loc, R*T, H] bfloat16 in the layout of ``handle`` (the :class:`LowLatencyDispatchResult`), or None
        with ``zero_copy`` (the outputs were written into :meth:`low_latency_combine_buffer`); ``topk_idx`` and
        ``topk_weights`` [N, K] as given to the dispatch. Returns a :data:`LowLatencyCombineResult` ``(out, hook)``
        produced on ``stream``; ``out``: an array [N, H] bfloat16 to write instead of a new one.

        ``stats_wait_ns`` (optional, cumulative, as the dispatch's): int64 [R] gains the nanoseconds the receive
        waited for each source rank's rows (nothing on a rank with no tokens, which waits for none)."""
        with _InCall(self, "low_latency_combine"):
            return _low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, stream,
                                        out, stats_wait_ns)

    def low_latency_combine_buffer(self, handle):
        """The library's combine buffer of ``handle``'s buffer set, [E_loc, R*T, H] bfloat16 (a view, no copy):
        write expert outputs there and combine with ``zero_copy=True``. Valid until this rank's combine on the set has
        received (the peers' next dispatch on the set may then write into it), and only while the communicator is open
        (unlike the arrays calls return, it is the communicator's own memory)."""
        with _InCall(self, "low_latency_combine_buffer"):
            return _low_latency_combine_buffer(self, handle)


cdef class _InCall:
    """``with _InCall(comm, what):`` a call of `comm` made by this thread, on the communicator's device (_OnDevice).
    One made while another thread is inside a call of the same communicator is refused before it does anything (the
    peers of a collective call then wait out the timeout: a program error, but no race on the communicator's state
    or memory); calls it makes itself in this thread are allowed. The outermost one collects the arrays of other
    libraries that the call takes (_keep_for_call) and holds them until the work it queued on their streams is done."""
    cdef Communicator comm
    cdef str what
    cdef _OnDevice device
    cdef bint outermost

    def __cinit__(self, Communicator comm, str what):
        self.comm = comm
        self.what = what
        self.device = _OnDevice(comm.device)

    def __enter__(self):
        # Frees a capture held back run here too (where the outputs come from another allocator), before the check:
        # they may release the GIL, and nothing may come between the check and the claim below.
        _run_deferred_frees()
        self.comm._check_no_call(self.what)
        # Claimed right after the check, in C (a Python call in between could let the garbage collector run a
        # finalizer, and another thread with it).
        self.comm._call_thread = PyThread_get_thread_ident()
        self.comm._call_depth += 1
        try:
            self.device.__enter__()
        except BaseException:
            self.comm._call_depth -= 1
            raise
        self.outermost = getattr(_taken, "by_stream", None) is None  # not a call made inside another call
        if self.outermost:
            _taken.by_stream = {}
        return self

    def __exit__(self, exc_type, exc, tb):
        cdef bint held = False
        try:
            if self.outermost:
                taken, _taken.by_stream = _taken.by_stream, None
                for stream, objects in taken.items():  # also after an error: work may have been queued
                    held |= _hold_until_done(objects, stream, self.comm.device)
                if held:  # not capturing: earlier calls' holds whose work is done are let go
                    _release_done_holds()
        except Exception:  # the driver failed to record an event (a broken context, which the next call reports)
            pass
        finally:
            self.comm._call_depth -= 1
            self.device.__exit__(exc_type, exc, tb)
        return False


def _expect(array, shape, dtype, str name, stream, int device):
    """A caller-provided output of exactly `shape` with elements of `dtype`'s size, or None where `shape` is None. A
    DeviceArray is re-targeted to the call that writes it on `stream`; any other device array must be C-contiguous
    and is wrapped in a DeviceArray over its memory, which holds the view: the array and, for DLPack, the capsule,
    whose deleter may be what frees the memory (a producer that exports a temporary)."""
    label = _out_label(name)
    if shape is None:
        if array is not None:
            raise DeepEPInvalidArgument(f"{label} is given but this call does not write it", 1)
        return None
    if array is None:
        raise DeepEPInvalidArgument(f"{label} is missing", 1)
    written = np.dtype(dtype)  # once: this runs for every out= array of every call
    if isinstance(array, DeviceArray):
        element = array.dtype
        if tuple(array.shape) != tuple(shape) or not _holds_bits_of(element, written):
            raise DeepEPInvalidArgument(
                f"{label} has shape {tuple(array.shape)} and dtype {element.name}; this call writes "
                f"{tuple(shape)} of {written.name}", 1)
        if array.device_id != device:
            raise DeepEPInvalidArgument(
                f"{label} is on device {array.device_id}; this communicator uses device {device}", 1)
        (<DeviceArray>array)._written_on(stream)
        _keep_for_call(array, stream_handle(stream))  # over another library's memory: held until the call is done
        return array
    view = _as_view(array, stream_handle(stream))
    element = check_dense(view, label, shape)
    _writable(view, label)
    if not _holds_bits_of(element, written):
        also = f" (or another {written.itemsize}-byte integer type: its bits)" if written.kind in "iu" else ""
        raise DeepEPInvalidArgument(
            f"{label} has dtype {dtype_name(element)}; this call writes {written.name}{also}", 1)
    kind = dtype_name(element)
    held = kind if kind in _STORAGE_DTYPES else element
    if kind not in _DLPACK_TYPES:  # another type of the same size (int16 for bfloat16, say): written bit for bit
        held = written
    return DeviceArray(view.ptr, shape, held, device, stream, owner=_OtherLibrarysMemory(view))


cdef bint _holds_bits_of(element, written):
    """Whether an output of `element`s can take what a call writes as `written`: the same size, and integers for
    integers (bfloat16 and float8_e4m3fn are written as their uint16 / uint8 bits, so their own types count too, and
    no other 2- or 1-byte type of ml_dtypes) or the same float type. Bool and complex elements, and a float of
    another kind (a float16 array for bfloat16 bits, a float32 one for int32 counts), would read the bits as values of
    their own. `written`: a NumPy dtype."""
    if element.itemsize != written.itemsize or element.kind in "bc":
        return False
    if written.kind == "f":
        return element == written
    if element.kind == "V":  # ml_dtypes' types (float8_e5m2, float4_e2m1fn, ...): only those written as these bits
        return _STORAGE_DTYPES.get(dtype_name(element)) == written
    return element.kind != "f"


cdef str _out_label(str name):
    """How messages name output `name`: "out recv_x" for a field, "out" and "out topk_weights" as given."""
    return name if name == "out" or name.startswith("out ") else f"out {name}"


cdef _writable(view, str label):
    """Refuses an output whose array says its memory is read-only (a JAX array, say)."""
    if getattr(view, "readonly", False):
        raise DeepEPInvalidArgument(f"{label} is read-only: pass a writable array", 1)


def _out_pointer(array, stream, name, shape, dtypes, int device):
    """Device pointer of a caller-provided output after checking it has exactly the needed shape and dtype. A
    DeviceArray is re-targeted to the call that writes it on `stream` (its readers and its free then follow the call;
    pass the stream object, which the array then keeps alive).
    """
    label = _out_label(name)
    names = [np.dtype(d).name for d in dtypes]
    if isinstance(array, DeviceArray):
        # Checked before it becomes this call's, so that a refused array keeps its stream; then its view is taken on
        # the call's stream, with no wait.
        _check_written_array(array, label, shape, names, device)
        (<DeviceArray>array)._written_on(stream)
        return _as_view(array, stream_handle(stream)).ptr
    view = _as_view(array, stream_handle(stream))
    _check_written_array(view, label, shape, names)
    return view.ptr


def _check_written_array(view, str label, shape, kinds, int device=-1):
    """Refuses an array a call would write unless it is dense with exactly `shape`, writable, of an element kind in
    `kinds` (by name: a DeviceArray holds float8_e4m3fn as uint8 bits, which are not a uint8 array) and, for a
    DeviceArray and `device` >= 0, on `device` (the library checks any other array's memory itself). Returns the
    kind."""
    element = check_dense(view, label, shape)
    _writable(view, label)
    kind = (<DeviceArray>view).dtype_name if isinstance(view, DeviceArray) else dtype_name(element)
    if kind not in kinds:
        raise DeepEPInvalidArgument(f"{label} has dtype {kind}; it must be " + " or ".join(kinds), 1)
    if device >= 0 and (<DeviceArray>view).device_id != device:
        raise DeepEPInvalidArgument(
            f"{label} is on device {(<DeviceArray>view).device_id}; this communicator uses device {device}", 1)
    return kind


include "_lowlatency.pxi"
