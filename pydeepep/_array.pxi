# DeviceArray: a typed view of device memory that exports DLPack and the CUDA array interface v3, so CuPy, PyTorch,
# JAX and numba take library outputs without a copy. Included into _core.pyx.

from cpython.pycapsule cimport PyCapsule_New, PyCapsule_IsValid, PyCapsule_GetPointer
from cpython.ref cimport Py_INCREF, Py_DECREF, PyObject
from libc.stdlib cimport malloc, free
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t

cdef extern from *:
    """
    /* DLPack structures (DLPack 1.x ABI), declared here so no DLPack header is needed at build time. */
    typedef struct { int32_t device_type; int32_t device_id; } pydeepep_DLDevice;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } pydeepep_DLDataType;
    typedef struct {
      void* data; pydeepep_DLDevice device; int32_t ndim; pydeepep_DLDataType dtype;
      int64_t* shape; int64_t* strides; uint64_t byte_offset;
    } pydeepep_DLTensor;
    typedef struct pydeepep_DLManagedTensor {
      pydeepep_DLTensor dl_tensor; void* manager_ctx; void (*deleter)(struct pydeepep_DLManagedTensor*);
    } pydeepep_DLManagedTensor;
    typedef struct { uint32_t major; uint32_t minor; } pydeepep_DLPackVersion;
    typedef struct pydeepep_DLManagedTensorVersioned {
      pydeepep_DLPackVersion version; void* manager_ctx;
      void (*deleter)(struct pydeepep_DLManagedTensorVersioned*); uint64_t flags; pydeepep_DLTensor dl_tensor;
    } pydeepep_DLManagedTensorVersioned;
    """
    ctypedef struct pydeepep_DLDevice:
        int32_t device_type
        int32_t device_id
    ctypedef struct pydeepep_DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct pydeepep_DLTensor:
        void* data
        pydeepep_DLDevice device
        int32_t ndim
        pydeepep_DLDataType dtype
        int64_t* shape
        int64_t* strides
        uint64_t byte_offset
    ctypedef struct pydeepep_DLManagedTensor:
        pydeepep_DLTensor dl_tensor
        void* manager_ctx
        void (*deleter)(pydeepep_DLManagedTensor*) noexcept nogil
    ctypedef struct pydeepep_DLPackVersion:
        uint32_t major
        uint32_t minor
    ctypedef struct pydeepep_DLManagedTensorVersioned:
        pydeepep_DLPackVersion version
        void* manager_ctx
        void (*deleter)(pydeepep_DLManagedTensorVersioned*) noexcept nogil
        uint64_t flags
        pydeepep_DLTensor dl_tensor

cdef enum:
    DL_CUDA = 2
    DL_INT = 0
    DL_UINT = 1
    DL_FLOAT = 2
    DL_BFLOAT = 4
    DL_BOOL = 6
    DL_FLOAT8_E4M3FN = 10

# (DLPack type code, bits) of each element type a DeviceArray can hold, by name. NumPy has no bfloat16 or float8:
# such arrays keep their raw bits in a uint16 / uint8 `dtype` (what to_numpy() and the CUDA array interface show)
# and export their true type through DLPack (`dtype_name` says which).
_DLPACK_TYPES = {
    "int32": (DL_INT, 32), "int64": (DL_INT, 64), "uint8": (DL_UINT, 8), "uint16": (DL_UINT, 16),
    "bool": (DL_BOOL, 8), "float32": (DL_FLOAT, 32), "bfloat16": (DL_BFLOAT, 16),
    "float8_e4m3fn": (DL_FLOAT8_E4M3FN, 8),
}
_STORAGE_DTYPES = {"bfloat16": np.dtype(np.uint16), "float8_e4m3fn": np.dtype(np.uint8)}

# Everything a consumer's DLPack tensor points to, freed by the deleter.
ctypedef struct _ExportContext:
    PyObject* owner
    int64_t shape[8]
    int64_t strides[8]


cdef _ExportContext* _new_context(DeviceArray array) except NULL:
    cdef _ExportContext* ctx = <_ExportContext*>malloc(sizeof(_ExportContext))
    if ctx == NULL:
        raise MemoryError()
    cdef int i
    for i in range(len(array.shape)):
        ctx.shape[i] = array.shape[i]
        ctx.strides[i] = array._element_strides[i]
    ctx.owner = <PyObject*>array
    Py_INCREF(array)
    return ctx


cdef extern from "Python.h":
    int _python_is_running "Py_IsInitialized"() nogil


cdef void _release_context(void* raw) noexcept nogil:
    cdef _ExportContext* ctx = <_ExportContext*>raw
    # A consumer may release the tensor after the interpreter is gone (a C++ holder at exit), where taking the GIL
    # would hang or crash: the array is then left to the process's end.
    if _python_is_running():
        with gil:
            Py_DECREF(<object>ctx.owner)
    free(ctx)


cdef void _delete_managed(pydeepep_DLManagedTensor* managed) noexcept nogil:
    _release_context(managed.manager_ctx)
    free(managed)


cdef void _delete_versioned(pydeepep_DLManagedTensorVersioned* managed) noexcept nogil:
    _release_context(managed.manager_ctx)
    free(managed)


cdef void _capsule_destructor(object capsule) noexcept:
    # Called when the capsule dies; if no consumer took it (name unchanged) the tensor is still ours to delete.
    cdef pydeepep_DLManagedTensor* managed
    cdef pydeepep_DLManagedTensorVersioned* versioned
    if PyCapsule_IsValid(capsule, b"dltensor"):
        managed = <pydeepep_DLManagedTensor*>PyCapsule_GetPointer(capsule, b"dltensor")
        managed.deleter(managed)
    elif PyCapsule_IsValid(capsule, b"dltensor_versioned"):
        versioned = <pydeepep_DLManagedTensorVersioned*>PyCapsule_GetPointer(capsule, b"dltensor_versioned")
        versioned.deleter(versioned)


cdef void _fill_tensor(pydeepep_DLTensor* tensor, DeviceArray array, _ExportContext* ctx):
    code, bits = _DLPACK_TYPES[array.dtype_name]
    tensor.data = <void*><size_t>array.ptr
    tensor.device.device_type = DL_CUDA
    tensor.device.device_id = array.device_id
    tensor.ndim = len(array.shape)
    tensor.dtype.code = code
    tensor.dtype.bits = bits
    tensor.dtype.lanes = 1
    tensor.shape = ctx.shape
    tensor.strides = ctx.strides
    tensor.byte_offset = 0


def _make_stream_wait(producer, consumer):
    """Makes `consumer` wait for the work enqueued so far on `producer` (no host wait), a stream of another device
    too: the event is made in the producer's context where the current one is not its (an event is recorded only on
    a stream of its own context; a stream may wait for an event of any)."""
    from cuda.bindings import driver

    what = "ordering two streams"
    event = _driver_result(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), what)
    try:
        if driver.cuEventRecord(event, driver.CUstream(producer))[0] != driver.CUresult.CUDA_SUCCESS:
            driver.cuEventDestroy(event)
            event = None
            context = _driver_result(driver.cuStreamGetCtx(driver.CUstream(producer)), what)
            _driver_result(driver.cuCtxPushCurrent(context), what)
            try:
                event = _driver_result(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), what)
                _driver_result(driver.cuEventRecord(event, driver.CUstream(producer)), what)
            finally:
                driver.cuCtxPopCurrent()
        _driver_result(driver.cuStreamWaitEvent(driver.CUstream(consumer), event, 0), what)
    finally:
        if event is not None:
            driver.cuEventDestroy(event)


# Stream-ordered allocation with direct calls into the driver: a Python-level allocator costs tens of microseconds per
# array, more than a whole small dispatch. The few entry points are looked up once in libcuda (by the same names
# cuda.h maps to); the pool and the contexts are set up once through cuda.bindings.
cdef extern from *:
    """
    typedef int (*pydeepep_alloc_fn)(unsigned long long*, size_t, void*, void*);
    typedef int (*pydeepep_free_fn)(unsigned long long, void*);
    typedef int (*pydeepep_push_fn)(void*);
    typedef int (*pydeepep_pop_fn)(void**);
    typedef int (*pydeepep_capturing_fn)(void*, int*);
    typedef int (*pydeepep_event_create_fn)(void**, unsigned int);
    typedef int (*pydeepep_event_record_fn)(void*, void*);
    typedef int (*pydeepep_event_fn)(void*);
    typedef int (*pydeepep_capture_mode_fn)(int*);
    static pydeepep_capture_mode_fn pydeepep_exchange_capture_mode = 0;
    static pydeepep_event_create_fn pydeepep_event_create = 0;
    static pydeepep_event_record_fn pydeepep_event_record = 0;
    static pydeepep_event_fn pydeepep_event_query = 0;
    static pydeepep_alloc_fn pydeepep_mem_alloc_from_pool_async = 0;
    static pydeepep_free_fn pydeepep_mem_free_async = 0;
    static pydeepep_push_fn pydeepep_ctx_push = 0;
    static pydeepep_pop_fn pydeepep_ctx_pop = 0;
    static pydeepep_capturing_fn pydeepep_stream_is_capturing = 0;
    """
    ctypedef int (*pydeepep_alloc_fn)(unsigned long long*, size_t, void*, void*) noexcept nogil
    ctypedef int (*pydeepep_free_fn)(unsigned long long, void*) noexcept nogil
    ctypedef int (*pydeepep_push_fn)(void*) noexcept nogil
    ctypedef int (*pydeepep_pop_fn)(void**) noexcept nogil
    ctypedef int (*pydeepep_capturing_fn)(void*, int*) noexcept nogil
    ctypedef int (*pydeepep_event_create_fn)(void**, unsigned int) noexcept nogil
    ctypedef int (*pydeepep_event_record_fn)(void*, void*) noexcept nogil
    ctypedef int (*pydeepep_event_fn)(void*) noexcept nogil
    ctypedef int (*pydeepep_capture_mode_fn)(int*) noexcept nogil
    pydeepep_capture_mode_fn pydeepep_exchange_capture_mode
    pydeepep_event_create_fn pydeepep_event_create
    pydeepep_event_record_fn pydeepep_event_record
    pydeepep_event_fn pydeepep_event_query
    pydeepep_alloc_fn pydeepep_mem_alloc_from_pool_async
    pydeepep_free_fn pydeepep_mem_free_async
    pydeepep_push_fn pydeepep_ctx_push
    pydeepep_pop_fn pydeepep_ctx_pop
    pydeepep_capturing_fn pydeepep_stream_is_capturing

cdef int CUDA_ERROR_OUT_OF_MEMORY = 2
cdef dict _pools = {}      # device ordinal -> CUmemoryPool handle, created on first use and kept for the process
cdef dict _contexts = {}   # device ordinal -> retained primary context handle


cdef int _load_driver() except -1:
    if pydeepep_mem_alloc_from_pool_async != NULL:
        return 0
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        free_address = ctypes.cast(lib.cuMemFreeAsync, ctypes.c_void_p).value
        push_address = ctypes.cast(lib.cuCtxPushCurrent_v2, ctypes.c_void_p).value
        pop_address = ctypes.cast(lib.cuCtxPopCurrent_v2, ctypes.c_void_p).value
        alloc_address = ctypes.cast(lib.cuMemAllocFromPoolAsync, ctypes.c_void_p).value
        capturing_address = ctypes.cast(lib.cuStreamIsCapturing, ctypes.c_void_p).value
        event_addresses = [ctypes.cast(f, ctypes.c_void_p).value
                           for f in (lib.cuEventCreate, lib.cuEventRecord, lib.cuEventQuery,
                                     lib.cuThreadExchangeStreamCaptureMode)]
    except (OSError, AttributeError) as exc:  # no driver, or one too old for stream-ordered pools: as the library
        raise DeepEPNoDevice(f"the CUDA driver (libcuda.so.1) could not be used: {exc}", 7) from exc
    cdef size_t free_fn = free_address
    cdef size_t push_fn = push_address
    cdef size_t pop_fn = pop_address
    cdef size_t alloc_fn = alloc_address
    cdef size_t capturing_fn = capturing_address
    cdef size_t create_fn = event_addresses[0], record_fn = event_addresses[1], query_fn = event_addresses[2]
    cdef size_t mode_fn = event_addresses[3]
    global pydeepep_mem_alloc_from_pool_async, pydeepep_mem_free_async, pydeepep_ctx_push, pydeepep_ctx_pop
    global pydeepep_stream_is_capturing, pydeepep_event_create, pydeepep_event_record, pydeepep_event_query
    global pydeepep_exchange_capture_mode
    pydeepep_exchange_capture_mode = <pydeepep_capture_mode_fn>mode_fn
    pydeepep_stream_is_capturing = <pydeepep_capturing_fn>capturing_fn
    pydeepep_event_create = <pydeepep_event_create_fn>create_fn
    pydeepep_event_record = <pydeepep_event_record_fn>record_fn
    pydeepep_event_query = <pydeepep_event_fn>query_fn
    pydeepep_mem_free_async = <pydeepep_free_fn>free_fn
    pydeepep_ctx_push = <pydeepep_push_fn>push_fn
    pydeepep_ctx_pop = <pydeepep_pop_fn>pop_fn
    pydeepep_mem_alloc_from_pool_async = <pydeepep_alloc_fn>alloc_fn  # last: it marks the table as loaded
    return 0


cdef int _capture_status(size_t stream, bint* capturing) noexcept:
    """cuStreamIsCapturing of `stream` in the current context: the driver's status, and whether it captures. The
    implicit-capture error (906: the legacy stream, while a blocking stream captures) counts as capturing."""
    cdef int capture = 0
    cdef int status = pydeepep_stream_is_capturing(<void*>stream, &capture)
    if status == 906:
        capturing[0] = True
        return 0
    capturing[0] = status == 0 and capture != 0
    return status


cdef bint _capturing(size_t stream, int device) except -1:
    """Whether `stream` (of `device`) is capturing a CUDA graph (a direct driver call: it runs on every allocation)."""
    _load_driver()
    cdef void* previous = NULL
    cdef bint capturing = False
    cdef int status = pydeepep_ctx_push(<void*>_primary_context(device))  # the legacy stream is the context's
    if status == 0:
        status = _capture_status(stream, &capturing)
        pydeepep_ctx_pop(&previous)
    if status != 0:
        raise DeepEPCudaError(f"cuStreamIsCapturing failed (CUDA driver error {status})", 3)
    return capturing


def _driver_result(result, str what):
    from cuda.bindings import driver

    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise DeepEPCudaError(f"{what} failed: {result[0]!r}", 3)
    return result[1] if len(result) > 1 else None


_visible = set()  # ordinals found visible to this process (a driver query the first time each is used)


cdef int _check_visible(int ordinal) except -1:
    """Refuses, with DeepEPNoDevice as the library does, an ordinal this process does not see (any, without a CUDA
    driver or with no device visible)."""
    if ordinal in _visible:
        return 0
    from .launch import local_device_count

    count = local_device_count()
    if not 0 <= ordinal < count:
        raise DeepEPNoDevice(f"device {ordinal} is not visible to this process, which sees {count} CUDA device(s)", 7)
    _visible.add(ordinal)
    return 0


cdef size_t _primary_context(int device) except 0:
    context = _contexts.get(device)
    if context is None:
        from cuda.bindings import driver

        _check_visible(device)

        _driver_result(driver.cuInit(0), "cuInit")
        dev = _driver_result(driver.cuDeviceGet(device), "cuDeviceGet")
        context = _contexts[device] = int(_driver_result(driver.cuDevicePrimaryCtxRetain(dev), "retaining the context"))
    return context


cdef class _OnDevice:
    """``with _OnDevice(device):`` makes the device's primary context current in this thread for the block, and the
    previous one current again after it. pydeepep's own driver calls run inside it: the caller's thread may have
    another device's context current, or none (a thread of its own), and the driver makes events in the current
    context and reads the legacy default stream (handle 1) as the current context's, as the library does once it
    has made the communicator's device current."""
    cdef void* context

    def __cinit__(self, int device):
        _load_driver()
        self.context = <void*>_primary_context(device)

    def __enter__(self):
        cdef int status = pydeepep_ctx_push(self.context)
        if status != 0:
            raise DeepEPCudaError(f"making a device's context current failed (CUDA driver error {status})", 3)
        return self

    def __exit__(self, exc_type, exc, tb):
        cdef void* previous = NULL
        pydeepep_ctx_pop(&previous)
        return False


cdef size_t _pool(int device) except 0:
    """pydeepep's memory pool on `device`. It keeps freed memory for reuse instead of returning it to the driver at
    every synchronisation (the default pool's behaviour), which would make each new output map fresh pages."""
    pool = _pools.get(device)
    if pool is None:
        from cuda.bindings import driver

        props = driver.CUmemPoolProps()
        props.allocType = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        props.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        props.location.id = device
        handle = _driver_result(driver.cuMemPoolCreate(props), "creating the memory pool")
        _driver_result(driver.cuMemPoolSetAttribute(
            handle, driver.CUmemPool_attribute.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            driver.cuuint64_t(0xFFFFFFFFFFFFFFFF)), "setting the memory pool's release threshold")
        pool = _pools[device] = int(handle)
    return pool


def empty_cache(device=None):
    """Returns the free memory of pydeepep's pools (all devices, or `device`) to the driver, as
    ``torch.cuda.empty_cache()`` does for PyTorch's: memory held by live arrays stays. Frees still in flight on
    their streams are returned once they complete, at a later call."""
    _release_done_holds()
    if not _pools:
        return
    _run_deferred_frees()
    from cuda.bindings import driver

    for ordinal, pool in list(_pools.items()):
        if device is None or ordinal == int(device):
            _driver_result(driver.cuMemPoolTrimTo(driver.CUmemoryPool(pool), 0), "trimming the memory pool")


@cython.no_gc
cdef class _Allocation:
    """Device memory from pydeepep's pool, freed stream-ordered on the stream it was allocated on, after the work that
    other streams using it (a shared allocation's writers, DeviceArray.record_stream) had queued by then. Memory that
    several arrays share (_empty_group) is freed once all of them are gone. no_gc: the garbage collector, freeing a
    reference cycle through an array, would otherwise empty other_streams, or destroy the streams (a CuPy stream's
    __del__), before __dealloc__, and the free would wait for nothing or run on a destroyed stream; untracked, what it
    holds counts as referenced from outside the cycle and lives until it is freed. The price: a cycle that runs back
    from a stream object to the arrays made on it is never collected (a Communicator passed as the stream, whose
    pending receive hooks hold such arrays, until close())."""
    cdef unsigned long long ptr
    cdef size_t stream
    cdef object stream_owner  # the Python object of `stream`, if any: kept alive until the free is queued
    cdef size_t context
    cdef bint shared
    cdef list other_streams  # (stream handle, stream owner) of the other streams the free waits for

    cdef _used_on(self, size_t handle, stream):
        """The free will wait for the work queued on `handle` (kept alive through `stream`, its owner) by then."""
        if handle == self.stream or any(handle == other for other, _ in self.other_streams or ()):
            return
        if self.other_streams is None:
            self.other_streams = []
        self.other_streams.append((handle, stream))

    def __dealloc__(self):
        if self.ptr == 0:
            return
        _free_or_defer(self.ptr, self.stream, self.stream_owner, self.context, self.other_streams)


# Frees that a stream capturing a CUDA graph held back: (ptr, stream, its owner, context, other streams), the owners
# keeping the streams alive until the free is queued. Freed on such a stream,
# or after work queued on one, the memory would become a free node of the graph, which may free only memory the graph
# allocated (the capture would fail); they run at the next allocation or empty_cache() once no stream captures.
_deferred_frees = []


cdef bint _free_or_defer(unsigned long long ptr, size_t stream, stream_owner, size_t context, list other_streams):
    """Frees `ptr` stream-ordered on `stream` after the work queued on `other_streams` ((handle, owner) pairs), or
    keeps it for later where one of those streams is capturing a graph; True once freed (or the driver is gone)."""
    cdef void* previous = NULL
    cdef bint capturing = False
    # The legacy default stream means "the current context's": make the owning device's context current.
    if pydeepep_ctx_push(<void*>context) != 0:
        return True  # at interpreter exit the driver may be gone, and with it the memory
    try:
        _capture_status(stream, &capturing)  # a stream the driver cannot query is freed on, as before
        for handle, _ in other_streams or ():
            if not capturing:
                _capture_status(handle, &capturing)
        if capturing:
            _deferred_frees.append((ptr, stream, stream_owner, context, other_streams))
            return False
        for handle, _ in other_streams or ():
            try:
                _make_stream_wait(handle, stream)
            except Exception:  # at interpreter exit the driver may be gone, and with it the work to order
                pass
        pydeepep_mem_free_async(ptr, <void*>stream)  # fails harmlessly at interpreter exit
        return True
    finally:
        pydeepep_ctx_pop(&previous)


# Objects that a call's queued work uses, held until that work is done: the arrays of other libraries that a call reads
# or writes, with the DLPack capsules taken from them (for a producer that exports a temporary, the capsule alone owns
# the memory). Their memory is not pydeepep's to free stream-ordered; released when their call was done, their
# library could hand it out again while the call still ran (a temporary passed straight in, or a caller that drops
# its array at once). Entries (event, device, objects), oldest first; released at the end of later calls that hold
# something themselves (so never at a call captured in a graph), empty_cache() and close(). Events are reused per
# device.
_held = collections.deque()
_spare_events = {}
# The objects the current call of this thread has taken so far, by stream (None outside a call): _InCall collects
# them, _as_view and the receive hooks add to them.
_taken = threading.local()


cdef _keep_for_call(obj, size_t stream):
    """Holds `obj` until the work the current call queues on `stream` is done (nothing outside a call). A DeviceArray
    only where it is over another library's out= array: pydeepep's own memory is freed stream-ordered anyway."""
    if isinstance(obj, DeviceArray) and not _holds_other_librarys_memory(<DeviceArray>obj):
        return
    taken = getattr(_taken, "by_stream", None)
    if taken is not None:
        taken.setdefault(stream, []).append(obj)


cdef bint _hold_until_done(objects, size_t stream, int device) except -1:
    """Keeps `objects` alive until the work queued so far on `stream` (of `device`, whose context is current) is
    done; whether it did. Not while `stream` captures a graph: its kernels run at each replay, so the caller keeps
    what a graph uses for the graph's life."""
    if _capturing(stream, device):
        return False
    spare = _spare_events.setdefault(device, [])
    cdef void* event = NULL
    cdef size_t handle
    if spare:
        handle = spare.pop()
        event = <void*>handle
    elif pydeepep_event_create(&event, 2) != 0:  # CU_EVENT_DISABLE_TIMING
        raise DeepEPCudaError("cuEventCreate failed while holding a call's arrays", 3)
    if pydeepep_event_record(event, <void*>stream) != 0:
        spare.append(<size_t>event)
        raise DeepEPCudaError("cuEventRecord failed while holding a call's arrays", 3)
    _held.append((<size_t>event, device, objects))
    return True


cdef _release_done_holds():
    """Lets go of the held objects whose work is done, oldest first (up to the first still running). Querying an
    event is an API call that a graph capture in global mode (PyTorch's) forbids to every thread; the events held
    were all recorded outside captures, so this thread queries in relaxed mode, which the capture then allows."""
    if not _held:
        return
    cdef int mode = 2  # CU_STREAM_CAPTURE_MODE_RELAXED
    if pydeepep_exchange_capture_mode(&mode) != 0:
        return
    try:
        _release_done_holds_now()
    finally:
        pydeepep_exchange_capture_mode(&mode)  # the thread's mode as it was


cdef _release_done_holds_now():
    cdef size_t event
    cdef int status
    cdef void* previous = NULL
    while _held:
        try:
            event, device, objects = _held[0]
        except IndexError:  # another thread took the rest
            return
        status = pydeepep_ctx_push(<void*>_primary_context(device))  # the event's context, current for the query
        if status == 0:
            status = pydeepep_event_query(<void*>event)
            pydeepep_ctx_pop(&previous)
        if status == 600:  # CUDA_ERROR_NOT_READY
            return
        try:
            if _held[0][0] != event:  # another thread released it meanwhile
                continue
            _held.popleft()
        except IndexError:
            return
        if status == 0:  # else the context is broken: the event is not reused, and the objects go
            _spare_events.setdefault(device, []).append(event)
        objects = None  # may free memory, run finalizers


cdef _run_deferred_frees():
    """The frees a capture held back whose streams capture no more (kept again where one still does). Entries are
    taken one at a time, so that a thread running them at the same time (a release by the garbage collector) never
    frees one twice, and one the driver refuses loses only itself."""
    if not _deferred_frees:
        return
    for _ in range(len(_deferred_frees)):
        try:
            entry = _deferred_frees.pop(0)
        except IndexError:  # another thread took the rest
            return
        ptr, stream, stream_owner, context, other_streams = entry
        try:
            _free_or_defer(ptr, stream, stream_owner, context, other_streams)
        except Exception:  # the memory stays with the pool until the process ends
            pass


cdef _Allocation _allocate(size_t nbytes, int device, size_t stream):
    _run_deferred_frees()
    if _capturing(stream, device):
        # The memory would belong to the graph, and a graph holding allocations it does not free cannot be launched
        # a second time.
        raise DeepEPInvalidUsage(
            "pydeepep cannot allocate on a stream that is capturing a CUDA graph: pass out= arrays allocated before "
            "the capture (for instance the result of an earlier call), so that every replay writes the same arrays", 2)
    cdef _Allocation block = _Allocation.__new__(_Allocation)
    cdef void* previous = NULL
    cdef int status
    block.context = _primary_context(device)  # first: it initialises the driver
    cdef size_t pool = _pool(device)
    block.stream = stream
    status = pydeepep_ctx_push(<void*>block.context)
    if status != 0:
        raise DeepEPCudaError(f"making device {device}'s context current failed (CUDA driver error {status})", 3)
    status = pydeepep_mem_alloc_from_pool_async(&block.ptr, nbytes, <void*>pool, <void*>stream)
    pydeepep_ctx_pop(&previous)
    if status != 0:
        block.ptr = 0
        if status == CUDA_ERROR_OUT_OF_MEMORY:
            raise DeepEPOutOfMemory(f"out of device memory allocating {nbytes} bytes on device {device}", 5)
        raise DeepEPCudaError(f"cuMemAllocFromPoolAsync of {nbytes} bytes failed (CUDA driver error {status})", 3)
    return block


cdef tuple _checked_shape(shape):
    """`shape` as a tuple of ints, refused where a DeviceArray cannot have it."""
    given = tuple(shape)
    cdef tuple checked
    try:
        checked = tuple(operator.index(extent) for extent in given)  # never a truncated float
    except TypeError:
        raise TypeError(f"DeviceArray shape {given!r} must hold integers") from None
    if len(checked) > 8:
        raise DeepEPInvalidArgument("DeviceArray supports at most 8 dimensions", 1)
    cdef object elements = 1  # a Python int: a product past 64 bits would wrap in C
    for extent in checked:
        if extent < 0:
            raise DeepEPInvalidArgument(f"DeviceArray shape {checked} has a negative extent", 1)
        elements *= extent
    if elements > _MAX_ALLOCATION:
        raise DeepEPInvalidArgument(f"DeviceArray shape {checked} has {elements} elements, more than any GPU holds", 1)
    return checked


# The element types stored as bits of another NumPy type, with their names (plain str, whatever str subclass named
# them).
_STORAGE_ELEMENTS = {name: (stored, name) for name, stored in _STORAGE_DTYPES.items()}


cdef tuple _element_type(dtype):
    """(NumPy dtype of the stored bits, element name) of `dtype`: "bfloat16", "float8_e4m3fn" or anything np.dtype
    takes, refused where a DeviceArray cannot hold it. Nothing is cached by `dtype` itself (equal dtypes may differ in
    metadata, equal strings in type): the name comes from dtype_name's cache, as NumPy's own dtype.name runs Python code
    (about 4 us, for every output of every call)."""
    found = _STORAGE_ELEMENTS.get(dtype) if isinstance(dtype, str) else None
    if found is not None:
        return found
    try:
        stored = np.dtype(dtype)
    except TypeError:
        raise DeepEPInvalidArgument(
            f"DeviceArray cannot hold dtype {dtype!r}; it holds {', '.join(_DLPACK_TYPES)}", 1) from None
    if not stored.isnative:
        raise DeepEPInvalidArgument(f"DeviceArray cannot hold dtype {stored.str} (non-native byte order)", 1)
    name = dtype_name(stored)
    found = _STORAGE_ELEMENTS.get(name)  # ml_dtypes' bfloat16 / float8_e4m3fn: stored as bits, as their names are
    if found is not None:
        return found
    if name not in _DLPACK_TYPES:
        raise DeepEPInvalidArgument(f"DeviceArray cannot hold dtype {name}; it holds {', '.join(_DLPACK_TYPES)}", 1)
    return (stored, name)


cdef class _OtherLibrarysMemory:
    """The owner of a DeviceArray over an out= array of another library: the view the call took of it (which keeps
    the array, and the DLPack capsule taken from it, alive). Calls that read or write such a DeviceArray hold it
    until their work is done, as they hold that library's arrays (_keep_for_call)."""
    cdef readonly object view

    def __cinit__(self, view):
        self.view = view


cdef bint _holds_other_librarys_memory(DeviceArray array):
    """Whether `array`, or the array it views (bits()), is over another library's out= array."""
    while array._owner is None and isinstance(array._base, DeviceArray):
        array = <DeviceArray>array._base
    return isinstance(array._owner, _OtherLibrarysMemory)


cdef DeviceArray _new_array(size_t ptr, tuple shape, tuple element, int device_id, size_t stream, owner):
    """A DeviceArray of parts already checked (_checked_shape, _element_type), without __init__'s checks: the calls
    make several outputs each, every time."""
    cdef DeviceArray array = DeviceArray.__new__(DeviceArray)
    array._set(ptr, shape, element, device_id, stream, owner)
    return array


cdef class DeviceArray:
    """A C-contiguous array in device memory produced by pydeepep.

    It exports ``__dlpack__`` / ``__dlpack_device__`` (honouring the consumer's stream) and
    ``__cuda_array_interface__`` v3 (with the producing stream), so ``cupy.asarray``, ``torch.from_dlpack``,
    ``jax.dlpack.from_dlpack`` and ``numba.cuda.as_cuda_array`` use the memory without a copy.
    """

    cdef readonly object shape
    cdef readonly object dtype       # NumPy dtype of the stored bits
    cdef readonly str dtype_name     # element type: a NumPy name, or "bfloat16" / "float8_e4m3fn"
    cdef readonly size_t ptr
    cdef readonly int device_id
    cdef object _stream           # int handle of the stream whose work produces the data (a view's: its base's)
    cdef object _owner            # keeps the memory alive (an _Allocation), or None
    cdef public object _stream_owner  # the Python object of `_stream`, kept alive while consumers may use it
    cdef object _base                 # an array whose memory this one views (kept alive, never freed here)
    cdef object _element_strides

    def __init__(self, ptr, shape, dtype, device_id, stream, owner=None):
        self._set(_address(ptr), _checked_shape(shape), _element_type(dtype),
                  _c_int("device_id", device_id), stream_handle(stream), owner)
        self._stream_owner = stream  # the exported stream must outlive the array's consumers

    cdef _set(self, size_t ptr, tuple shape, tuple element, int device_id, size_t stream, owner):
        """Fills the fields from parts already checked (_checked_shape, _element_type, stream_handle)."""
        self.ptr = ptr
        self.shape = shape
        self.dtype, self.dtype_name = element
        self.device_id = device_id
        self._stream = stream
        self._owner = owner
        strides = []
        step = 1
        for extent in reversed(shape):
            strides.append(step)
            step *= max(extent, 1)
        self._element_strides = tuple(reversed(strides))

    cdef _written_on(self, stream):
        """Re-targets an ``out=`` array to the call about to write it on `stream` (a handle or a stream object): the
        call first waits for the array's last producer, consumers then wait for the call, and the memory is freed on
        `stream`, after the write (the stream object is kept alive, as for new arrays)."""
        if isinstance(self._base, DeviceArray):  # a view (bits()): its base holds the memory and the stream
            (<DeviceArray>self._base)._written_on(stream)
            self._stream_owner = stream
            return
        cdef size_t handle = stream_handle(stream)
        if handle != self._stream and _capturing(handle, self.device_id):
            # The wait would be on an event recorded outside the capture, and the memory would be freed inside it.
            raise DeepEPInvalidUsage(
                "an out= array made on another stream is written by a call being captured in a CUDA graph: make the "
                "out= arrays on the capturing stream (before the capture)", 2)
        if isinstance(self._owner, DeviceArray):  # a view made over another array: its memory waits for the write
            (<DeviceArray>self._owner).record_stream(stream)
        if handle == self._stream:
            return
        with _OnDevice(self.device_id):
            _make_stream_wait(self._stream, handle)
        self._stream = handle
        cdef _Allocation block
        if not isinstance(self._owner, _Allocation):  # memory pydeepep did not allocate: only the export changes
            self._stream_owner = stream
        else:
            block = <_Allocation>self._owner
            if not block.shared:
                block.stream, block.stream_owner = handle, stream
                self._stream_owner = stream
            else:
                # The other arrays of the memory may still be written on its first stream: the free waits for both.
                block._used_on(handle, stream)

    def record_stream(self, stream):
        """Keeps the memory from reuse until the work queued on ``stream`` (a stream object or handle) when the array
        is released is done, as ``torch.Tensor.record_stream`` does: for an array read or written on another stream
        than the one it was made on. Memory pydeepep did not allocate is left alone."""
        cdef _Allocation block
        if isinstance(self._owner, _Allocation):
            block = <_Allocation>self._owner
            block._used_on(stream_handle(stream), stream)
        elif isinstance(self._base, DeviceArray):  # a view (bits()): the memory is its base's
            self._base.record_stream(stream)
        elif isinstance(self._owner, DeviceArray):
            self._owner.record_stream(stream)

    def __reduce__(self):
        raise TypeError(
            "a pydeepep.DeviceArray cannot be pickled or copied: it owns device memory of this process (a copy would "
            "free it twice); to_numpy() gives its values, and an array library (cupy.array, torch.clone) a device copy")

    @property
    def stream(self):
        """The int handle of the stream whose work produces the data. A view (``bits()``) follows its base, which
        a later call may write on another stream (``out=``)."""
        if isinstance(self._base, DeviceArray):
            return (<DeviceArray>self._base).stream
        return self._stream

    @property
    def strides(self):
        """None: DeviceArrays are C-contiguous (as in the CUDA array interface)."""
        return None

    @property
    def size(self):
        return self.element_count()

    cdef size_t element_count(self):
        cdef size_t n = 1
        for extent in self.shape:
            n *= <size_t>extent
        return n

    @property
    def nbytes(self):
        return self.byte_size()

    cdef size_t byte_size(self):
        return self.element_count() * <size_t>self.dtype.itemsize

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr if self.size else 0, False),  # CAI v3: 0 for an array of no elements
            "version": 3,
            "strides": None,
            "stream": self.stream,
        }

    def __dlpack_device__(self):
        return (DL_CUDA, self.device_id)

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("pydeepep.DeviceArray exports without copying; copy=True is not supported")
        if dl_device is not None and tuple(dl_device) != (DL_CUDA, self.device_id):
            raise BufferError(f"cannot export to device {dl_device}; the data is on CUDA device {self.device_id}")
        # DLPack: None means the legacy default stream, -1 means "do not synchronise"; 0 is disallowed (it could mean
        # the legacy or the per-thread default stream).
        if stream == 0 and not isinstance(stream, bool):
            raise BufferError("DLPack disallows stream 0 for CUDA: pass 1 (legacy default), 2 (per-thread default), "
                              "a stream handle, -1 or None")
        if stream != -1:
            consumer = LEGACY_DEFAULT_STREAM if stream is None else stream_handle(stream)
            if consumer != self.stream:
                with _OnDevice(self.device_id):
                    _make_stream_wait(self.stream, consumer)
        cdef _ExportContext* ctx = _new_context(self)
        cdef pydeepep_DLManagedTensorVersioned* versioned
        cdef pydeepep_DLManagedTensor* managed
        try:
            if max_version is not None and tuple(max_version)[0] >= 1:
                versioned = <pydeepep_DLManagedTensorVersioned*>malloc(sizeof(pydeepep_DLManagedTensorVersioned))
                if versioned == NULL:
                    raise MemoryError()
                versioned.version.major = 1
                # 1.1 named the float8 type codes; a consumer that reads only 1.0 gets 1.0 (its float8 codes unknown
                # to it, as to any 1.0 consumer).
                versioned.version.minor = 1 if tuple(max_version) >= (1, 1) else 0
                versioned.manager_ctx = ctx
                versioned.deleter = _delete_versioned
                versioned.flags = 0
                _fill_tensor(&versioned.dl_tensor, self, ctx)
                return PyCapsule_New(versioned, b"dltensor_versioned", <void(*)(object) noexcept>_capsule_destructor)
            managed = <pydeepep_DLManagedTensor*>malloc(sizeof(pydeepep_DLManagedTensor))
            if managed == NULL:
                raise MemoryError()
            managed.manager_ctx = ctx
            managed.deleter = _delete_managed
            _fill_tensor(&managed.dl_tensor, self, ctx)
            return PyCapsule_New(managed, b"dltensor", <void(*)(object) noexcept>_capsule_destructor)
        except BaseException:
            _release_context(ctx)
            raise

    def bits(self):
        """The same memory typed as its raw bits (uint16 for bfloat16, uint8 for float8; itself otherwise), for
        consumers without those DLPack types. Keeps this array alive, and exports its stream: where a later call
        writes this array (``out=``) on another stream, the view follows."""
        if self.dtype_name == dtype_name(self.dtype):
            return self
        cdef DeviceArray view = DeviceArray(self.ptr, self.shape, self.dtype, self.device_id, self.stream)
        view._base = self
        return view

    def to_numpy(self):
        """Copies the array to a new NumPy array (waits for the producing stream)."""
        from cuda.bindings import driver

        out = np.empty(self.shape, dtype=self.dtype)
        if out.nbytes:
            with _OnDevice(self.device_id):  # the stream may be the legacy default one: this device's
                status, = driver.cuMemcpyDtoHAsync(out.ctypes.data, self.ptr, out.nbytes,
                                                   driver.CUstream(self.stream))
                if status == driver.CUresult.CUDA_SUCCESS:
                    status, = driver.cuStreamSynchronize(driver.CUstream(self.stream))
            if status != driver.CUresult.CUDA_SUCCESS:
                raise DeepEPCudaError(f"copy to host failed: {status!r}", 3)
        return out

    def __repr__(self):
        return (f"DeviceArray(shape={self.shape}, dtype={self.dtype_name}, device={self.device_id}, "
                f"ptr=0x{self.ptr:x}, stream={self.stream})")
