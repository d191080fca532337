# Low-latency dispatch and combine (include/deepep/deepep.h, "Low-latency (LL) dispatch and combine"). Included into
# _core.pyx; the Communicator methods low_latency_* forward here.
#
# Buffer sets: dispatch i runs on set i % 2 and its combine on the same set. The Python side remembers, per set, the
# generation (dispatches started on it) and an unfinished Send phase, and refuses what would read a reused set: a
# combine or a combine buffer of a result whose set a later dispatch took (dispatch i + 2), a second Send on a set
# whose receive hook was never called, a hook called twice or after its set was reused. A call refused on this rank
# once those checks passed still runs its side of the call without data (deepepLowLatencyRefuseCall: the library does
# it for what it refuses itself), so that the other ranks finish it at once; a refused dispatch counts as made.


class LowLatencyDispatchResult:
    """What :meth:`Communicator.low_latency_dispatch` returns, and the handle its combine takes.

    ``recv_x`` [E_loc, R*T, H] float8_e4m3fn (or bfloat16 without FP8); ``recv_scales`` [E_loc, R*T, H/128] float32,
    or UE8M0-packed int32 [E_loc, R*T, ceil(H/512)] ([E_loc, columns, R*T] with scales_token_contiguous), or None;
    ``recv_count`` [E_loc] int32 rows per local expert (rows grouped by source rank, then source token);
    ``recv_src_info`` [E_loc, R*T] int32: source token index in bits 0..15 and the source's top-k slot from bit 16, -1
    past the count; ``recv_layout_range`` [E_loc, R, 2] int32: (first row, rows) of each source rank. ``hook``: with
    ``return_recv_hook``, a callable that receives (the arrays hold the data once it ran, stream-ordered); else None.
    ``buffer_set`` and ``generation`` name the buffer set the result lives in; it stays valid until the dispatch after
    next starts, or until a later call given its routing arrays as ``out=`` writes them. ``refused``: the result a
    dispatch refused on this rank raised with (``exc.refused_result``; no arrays): a combine given it runs this rank's
    side of the combine without data and raises, so that the ranks stay in step.
    """

    __slots__ = ("recv_x", "recv_scales", "recv_count", "recv_src_info", "recv_layout_range", "hook", "buffer_set",
                 "generation", "num_experts", "num_tokens", "num_topk", "hidden", "use_fp8", "comm", "refused")

    def __repr__(self):
        return (f"LowLatencyDispatchResult(set={self.buffer_set}, generation={self.generation}, "
                f"num_tokens={self.num_tokens}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"use_fp8={self.use_fp8}, hook={'pending' if self.hook is not None else None})")


LowLatencyCombineResult = collections.namedtuple("LowLatencyCombineResult", ["out", "hook"])
LowLatencyCombineResult.__doc__ = """What a low-latency combine returns: ``out`` [N, H] bfloat16 and ``hook`` (with
``return_recv_hook``, a callable that receives and writes ``out``; else None)."""


class _LowLatencyBook:
    """Per-communicator bookkeeping of the two buffer sets (host side, cheap checks only)."""

    def __init__(self, int max_tokens):
        self.max_tokens = max_tokens
        self.dispatches = 0               # dispatches issued: dispatch i uses set i % 2
        self.generation = [0, 0]          # dispatches started on each set
        self.pending = [None, None]       # an unfinished Send on the set: its hook object

    def started(self, int buffer_set):
        """Counts a dispatch on the set (a refused one too: it counts as made on every rank); its generation."""
        self.dispatches += 1
        self.generation[buffer_set] += 1
        return self.generation[buffer_set]

    def check_out_arrays(self, int buffer_set, arrays, bint device_arrays_only=False):
        """Refuses out= arrays of a call on `buffer_set` (with `device_arrays_only`, the DeviceArrays among them)
        that the due receive of the other set's call writes. A Python rule, not the library's: a result here is
        arrays that stay valid, which that receive would overwrite; a C caller may reuse an array between the calls
        (consume one set's outputs, then let the other set's Recv write the same memory), which is stream-ordered."""
        other = self.pending[1 - buffer_set]
        if other is None:
            return
        if device_arrays_only:
            arrays = [array for array in arrays if isinstance(array, DeviceArray)]
        if _overlap(_spans(arrays), _spans(other.writes)):
            raise DeepEPInvalidUsage(
                f"out= holds arrays of the {other.kind} sent on buffer set {1 - buffer_set}, whose receive hook was "
                "not called yet: that receive would write the same arrays; call it first", 2)

    def check_not_pending(self, int buffer_set, str what):
        if self.pending[buffer_set] is not None:
            raise DeepEPInvalidUsage(
                f"{what} on buffer set {buffer_set}, but the receive hook of the {self.pending[buffer_set].kind} "
                f"sent on that set was never called; call it first", 2)

    def check_current(self, handle, str what):
        if handle.generation != self.generation[handle.buffer_set]:
            raise DeepEPInvalidUsage(
                f"{what}: the dispatch result is stale (buffer set {handle.buffer_set} was reused by a later "
                "dispatch; a result stays valid until the dispatch after next)", 2)


cdef tuple _spans(arrays):
    """The device memory of `arrays` as (first byte, end) ranges; None and empty arrays (which may share an address
    with anything, 0 included) hold none."""
    cdef list spans = []
    cdef size_t start, nbytes
    for array in arrays:
        if array is None:
            continue
        if isinstance(array, DeviceArray):  # the common case, without Python attribute calls
            start, nbytes = (<DeviceArray>array).ptr, (<DeviceArray>array).byte_size()
        else:
            start, nbytes = array.ptr, array.nbytes
        if nbytes:
            spans.append((start, start + nbytes))
    return tuple(spans)


cdef bint _overlap(tuple spans, tuple others):
    """Whether a range of `spans` shares a byte with one of `others`."""
    cdef size_t start, end, other_start, other_end
    for start, end in spans:
        for other_start, other_end in others:
            if start < other_end and other_start < end:
                return True
    return False


cdef tuple _dispatch_outputs(result):
    """The arrays a low-latency dispatch result holds (or an out= object gives)."""
    return (result.recv_x, result.recv_scales, result.recv_count, result.recv_src_info, result.recv_layout_range)


cdef object _ll_book(Communicator comm):
    cdef int max_tokens = 0
    cdef deepepComm_t c = comm._live()
    if comm._ll is None:
        _check(deepepCommLowLatencyMaxTokens(c, &max_tokens))
        comm._ll = _LowLatencyBook(max_tokens)
    book = comm._ll
    if book.max_tokens <= 0:
        raise DeepEPInvalidUsage(
            "this communicator has no low-latency area: create it with low_latency_max_tokens > 0", 2)
    return book


cdef class _LowLatencyHook:
    """The receive phase of a low-latency call sent with return_recv_hook: calling it launches the receive kernel on
    the stream of the send (no host synchronisation; capturable). Call it exactly once, before the set is reused."""

    cdef deepepLowLatencyDispatchArgs dispatch_args
    cdef deepepLowLatencyCombineArgs combine_args
    cdef readonly str kind
    cdef object comm
    cdef object book
    cdef int buffer_set
    cdef object generation
    cdef size_t stream
    cdef object keep   # arrays the call reads or writes, kept alive until the hook ran
    cdef readonly tuple writes  # the arrays the receive writes, until it ran
    cdef object result  # a dispatch's result, until the hook ran: marked refused where its receive is refused
    cdef bint done
    cdef bint handed   # the library has the call (it refuses on its own from there)

    cdef arm(self, str kind, Communicator comm, book, int buffer_set, generation, size_t stream, tuple writes,
             result=None):
        """Makes this the receive hook due on `buffer_set`, whose send just went out as `generation` (a dispatch's
        with its `result`), and whose receive writes the arrays `writes`."""
        self.kind = kind
        self.writes = writes
        self.result = result
        self.comm = comm
        self.book = book
        self.buffer_set = buffer_set
        self.generation = generation
        self.stream = stream
        book.pending[buffer_set] = self

    def __call__(self):
        if self.done:
            raise DeepEPInvalidUsage(f"this {self.kind} receive hook was already called", 2)
        cdef Communicator comm = self.comm
        cdef deepepComm_t c = NULL
        comm._live()  # a closed communicator says so first
        if self.book.pending[self.buffer_set] is not self or self.book.generation[self.buffer_set] != self.generation:
            raise DeepEPInvalidUsage(f"this {self.kind} receive hook belongs to a buffer set that was reused", 2)
        cdef deepepResult_t status
        cdef CUstream_st* cs = <CUstream_st*>self.stream
        with _InCall(comm, f"the {self.kind} receive hook"):
            c = comm._live()  # inside the guard: a close() from another thread before it is refused
            _keep_for_call(self.keep, self.stream)  # the receive reads and writes them after this returns
            if self.kind == "dispatch":
                self.dispatch_args.phase = deepepLowLatencyRecv
                with nogil:
                    status = deepepLowLatencyDispatch(c, &self.dispatch_args, cs)
            else:
                self.combine_args.phase = deepepLowLatencyRecv
                with nogil:
                    status = deepepLowLatencyCombine(c, &self.combine_args, cs)
        # Done also when the library refused the receive: it then completed the operation without data (unless the
        # stream is capturing, where it launches nothing and the receive is still to make).
        if status == deepepSuccess or not _capturing(self.stream, comm.device):
            self.done = True
            self.book.pending[self.buffer_set] = None
            self.keep = self.writes = None
            if status != deepepSuccess and self.result is not None:
                # No outputs were written: its combine, which the other ranks make, runs this rank's side without
                # data and raises, as for a refused dispatch.
                self.result.refused = True
            self.result = None
        _check(status)


def _array3(obj, stream, str name, shape, kinds, int device):
    """Pointer and element kind of a contiguous 3-D device array of exactly `shape` whose kind is in `kinds`."""
    view = _as_view(obj, stream)
    element = check_dense(view, name, shape)
    kind = _payload_kind(obj, view, name) if "bfloat16" in kinds else dtype_name(element)
    if kind not in kinds:
        raise DeepEPInvalidArgument(f"{name} has dtype {kind}; it must be " + " or ".join(kinds), 1)
    return view.ptr, view


def _stats_array(obj, stream, str name, int64_t length, kinds=("int64",)):
    """(device pointer, view, dtype name) of an optional contiguous array [length] of load statistics whose dtype is
    in `kinds` ((0, None, None) for None)."""
    if obj is None:
        return 0, None, None
    if isinstance(obj, DeviceArray):  # read and added to by the call: its readers and its free follow the call
        kind = _check_written_array(obj, name, (length,), kinds)  # first: a refused array keeps its stream
        (<DeviceArray>obj)._written_on(stream)
        return obj.ptr, _as_view(obj, stream_handle(stream)), kind
    view = _as_view(obj, stream_handle(stream))
    return view.ptr, view, _check_written_array(view, name, (length,), kinds)


def _ll_routing(Communicator comm, topk_idx, stream, int64_t num_tokens, int max_tokens):
    cdef _View tv = _matrix(topk_idx, stream, "topk_idx", (np.int64, np.int32), comm.device)
    if num_tokens >= 0 and tv.rows != num_tokens:
        raise DeepEPInvalidArgument(f"topk_idx has {tv.rows} rows; {num_tokens} are needed", 1)
    if tv.rows > max_tokens:
        raise DeepEPInvalidArgument(
            f"{tv.rows} tokens are more than the low-latency max_tokens ({max_tokens}) of this communicator", 1)
    if not 1 <= tv.cols <= DEEPEP_MAX_TOPK:
        raise DeepEPInvalidArgument(f"topk_idx has {tv.cols} columns; num_topk must be in [1, {DEEPEP_MAX_TOPK}]", 1)
    return tv


cdef void _refuse_low_latency(deepepComm_t c, int combine, int buffer_set, deepepLowLatencyPhase_t phase,
                              size_t stream) noexcept:
    """This rank's side of a low-latency call refused here before the library had it (deepepLowLatencyRefuseCall),
    so that the other ranks finish it at once with DeepEPRemoteError instead of waiting out the timeout."""
    with nogil:
        deepepLowLatencyRefuseCall(c, combine, buffer_set, phase, <CUstream_st*>stream)  # best effort


cdef int _next_dispatch_set(book) except -1:
    """The buffer set of the next dispatch, once no receive hook is still due on it."""
    cdef int buffer_set = book.dispatches % 2
    book.check_not_pending(buffer_set, "a dispatch")
    return buffer_set


cdef deepepLowLatencyPhase_t _phase(bint return_recv_hook):
    """The phases a low-latency call makes now: with a receive hook only the send."""
    return deepepLowLatencySend if return_recv_hook else deepepLowLatencySendRecv


cdef _count_refused_dispatch(Communicator comm, book, int buffer_set, num_experts, bint use_fp8, exc):
    """Counts a dispatch refused on this rank as made (it is, on every rank) and gives `exc` its place in the
    sequence (exc.refused_result), for the combine the other ranks will make of it."""
    refused = LowLatencyDispatchResult()
    refused.recv_x = refused.recv_scales = refused.recv_count = refused.hook = None
    refused.recv_src_info = refused.recv_layout_range = None
    refused.buffer_set = buffer_set
    refused.generation = book.started(buffer_set)
    refused.num_experts = num_experts
    refused.num_tokens = refused.num_topk = refused.hidden = -1
    refused.use_fp8 = use_fp8
    refused.comm = comm
    refused.refused = True
    try:
        exc.refused_result = refused
    except AttributeError:  # an exception type without attributes of its own
        pass


def _refuse_low_latency_dispatch(Communicator comm, num_experts, bint use_fp8, bint return_recv_hook, exc, stream):
    """This rank's side of a low-latency dispatch that a wrapper (the DeepEP adapter) refused with `exc` before
    pydeepep had the call: as for a dispatch pydeepep refuses, it runs without data, counts as made, and `exc` gets
    its refused_result. Raises instead, refusing nothing, where pydeepep could not refuse the call either (no
    low-latency area, a receive hook due on the buffer set, a stream that is no stream)."""
    cdef int buffer_set
    cdef size_t s
    with _InCall(comm, "refusing a low-latency dispatch"):
        book = _ll_book(comm)
        buffer_set = _next_dispatch_set(book)
        s = stream_handle(stream)
        _refuse_low_latency(comm._live(), 0, buffer_set, _phase(return_recv_hook), s)
        _count_refused_dispatch(comm, book, buffer_set, num_experts, use_fp8, exc)


def _low_latency_dispatch(Communicator comm, x, topk_idx, num_experts, bint use_fp8, bint round_scale,
                          bint use_ue8m0, bint return_recv_hook, stream, out, stats_recv_count=None,
                          stats_wait_ns=None, bint scales_token_contiguous=False):
    book = _ll_book(comm)
    cdef deepepComm_t c = comm._live()
    cdef size_t s = comm._last_stream  # where the refusal runs if `stream` cannot be read
    cdef int buffer_set = _next_dispatch_set(book)
    cdef _LowLatencyHook hook = _LowLatencyHook.__new__(_LowLatencyHook)
    _check(deepepLowLatencyDispatchArgsInit(&hook.dispatch_args, sizeof(hook.dispatch_args)))
    hook.dispatch_args.buffer_set = buffer_set
    hook.dispatch_args.phase = _phase(return_recv_hook)
    try:
        s = comm._call_stream(stream)
        # num_experts is converted here, so that a count that is no integer is refused like any other bad argument.
        experts = _c_int("num_experts", num_experts)
        result = _low_latency_dispatch_call(comm, hook, s, x, topk_idx, experts, use_fp8, round_scale, use_ue8m0,
                                            stream, out, stats_recv_count, stats_wait_ns, scales_token_contiguous)
    except BaseException as exc:
        # Refused on this rank: its side of the call still runs, without data, and the call counts as made.
        if not hook.handed:
            _refuse_low_latency(c, 0, buffer_set, hook.dispatch_args.phase, s)
        _count_refused_dispatch(comm, book, buffer_set, num_experts, use_fp8, exc)
        raise
    result.generation = book.started(buffer_set)  # the set now belongs to this dispatch
    if return_recv_hook:
        hook.arm("dispatch", comm, book, buffer_set, result.generation, s, _dispatch_outputs(result), result)
        result.hook = hook
    return result


def _low_latency_dispatch_call(Communicator comm, _LowLatencyHook hook, size_t s, x, topk_idx, int num_experts,
                               bint use_fp8, bint round_scale, bint use_ue8m0, stream, out, stats_recv_count,
                               stats_wait_ns, bint scales_token_contiguous):
    """The checks and the library call of _low_latency_dispatch, into hook.dispatch_args; returns the result."""
    cdef deepepComm_t c = comm._live()
    cdef int R = comm.nranks
    cdef int buffer_set = hook.dispatch_args.buffer_set
    if num_experts <= 0 or num_experts % R != 0:
        raise DeepEPInvalidArgument(
            f"num_experts is {num_experts}; it must be a positive multiple of the number of ranks ({R})", 1)
    if num_experts // R > DEEPEP_MAX_LOCAL_EXPERTS:  # before the outputs, which it sizes, are allocated
        raise DeepEPInvalidArgument(
            f"num_experts / nranks is {num_experts // R}; at most {DEEPEP_MAX_LOCAL_EXPERTS} experts per rank", 1)
    if use_ue8m0 and not round_scale:
        raise DeepEPInvalidArgument("use_ue8m0 needs round_scale=True (UE8M0 holds powers of two)", 1)
    if not use_fp8 and (round_scale or use_ue8m0):
        raise DeepEPInvalidArgument("round_scale and use_ue8m0 shape FP8 scales; they need use_fp8=True", 1)
    view = _as_view(x, s)
    kind = _payload_kind(x, view)
    if kind != "bfloat16":
        raise DeepEPInvalidArgument(f"x has dtype {kind}; low-latency dispatch takes bfloat16 rows (FP8 is cast "
                                    "inside the kernel)", 1)
    cdef _View xv = _matrix(x, s, "x", None, comm.device, kind, view)
    cdef int T = comm._ll.max_tokens
    if xv.rows > T:
        raise DeepEPInvalidArgument(
            f"x has {xv.rows} tokens, more than the low-latency max_tokens ({T}) of this communicator", 1)
    if use_fp8 and xv.cols % 128 != 0:
        raise DeepEPInvalidArgument(f"hidden is {xv.cols}; FP8 output needs a multiple of 128", 1)
    cdef _View tv = _ll_routing(comm, topk_idx, s, xv.rows, T)

    cdef int local = num_experts // R
    cdef int64_t hidden = xv.cols
    cdef int64_t rows = <int64_t>R * T
    payload = "float8_e4m3fn" if use_fp8 else "bfloat16"
    columns = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
    scales_shape = (local, columns, rows) if scales_token_contiguous else (local, rows, columns)
    scales_dtype = np.int32 if use_ue8m0 else np.float32
    if out is None:
        recv_x = empty((local, rows, hidden), payload, device=comm.device, stream=stream)
        recv_scales, recv_count, recv_src_info, recv_layout_range = _empty_group((
            (scales_shape, scales_dtype) if use_fp8 else None, ((local,), np.int32), ((local, rows), np.int32),
            ((local, R, 2), np.int32)), comm.device, stream)
    else:
        outputs = _dispatch_outputs(out)
        # Arrays a due receive writes are refused before _expect makes them this call's (their stream would become
        # this call's); another library's view of them is known by its address once wrapped, below.
        comm._ll.check_out_arrays(buffer_set, outputs, True)
        given_x, given_scales, given_count, given_info, given_ranges = outputs
        recv_x = _expect(given_x, (local, rows, hidden), np.uint8 if use_fp8 else np.uint16, "recv_x", stream,
                         comm.device)
        recv_scales = _expect(given_scales, scales_shape if use_fp8 else None, scales_dtype, "recv_scales", stream,
                              comm.device)
        recv_count = _expect(given_count, (local,), np.int32, "recv_count", stream, comm.device)
        recv_src_info = _expect(given_info, (local, rows), np.int32, "recv_src_info", stream, comm.device)
        recv_layout_range = _expect(given_ranges, (local, R, 2), np.int32, "recv_layout_range", stream, comm.device)
        comm._ll.check_out_arrays(buffer_set, (recv_x, recv_scales, recv_count, recv_src_info, recv_layout_range))

    count_ptr, count_view, count_kind = _stats_array(stats_recv_count, stream, "stats_recv_count", local,
                                                     ("int64", "int32"))
    wait_ptr, wait_view, _ = _stats_array(stats_wait_ns, stream, "stats_wait_ns", R)

    cdef deepepLowLatencyDispatchArgs* a = &hook.dispatch_args
    a.num_tokens = xv.rows
    a.x = <const void*><size_t>xv.ptr
    a.hidden = <int>hidden
    a.x_row_stride = xv.stride
    a.topk_idx = <const void*><size_t>tv.ptr
    a.topk_type = deepepInt64 if tv.kind == "int64" else deepepInt32
    a.num_topk = <int>tv.cols
    a.topk_row_stride = tv.stride
    a.num_experts = num_experts
    a.use_fp8 = 1 if use_fp8 else 0
    a.round_scale = 1 if round_scale else 0
    a.use_ue8m0 = 1 if use_ue8m0 else 0
    a.recv_x = <void*><size_t>recv_x.ptr
    a.recv_scales = <void*><size_t>(recv_scales.ptr if recv_scales is not None else 0)
    a.recv_count = <int32_t*><size_t>recv_count.ptr
    a.recv_src_info = <int32_t*><size_t>recv_src_info.ptr
    a.recv_layout_range = <int32_t*><size_t>recv_layout_range.ptr
    a.scales_token_contiguous = 1 if scales_token_contiguous else 0
    a.stats_recv_count = <void*><size_t>count_ptr
    a.stats_recv_count_type = deepepInt32 if count_kind == "int32" else deepepInt64
    a.stats_wait_ns = <int64_t*><size_t>wait_ptr
    cdef deepepResult_t status
    hook.handed = True
    with nogil:
        status = deepepLowLatencyDispatch(c, a, <CUstream_st*>s)
    _check(status)

    result = LowLatencyDispatchResult()
    result.recv_x = recv_x
    result.recv_scales = recv_scales
    result.recv_count = recv_count
    result.recv_src_info = recv_src_info
    result.recv_layout_range = recv_layout_range
    result.buffer_set = buffer_set
    result.num_experts = num_experts
    result.num_tokens = xv.rows
    result.num_topk = tv.cols
    result.hidden = hidden
    result.use_fp8 = use_fp8
    result.comm = comm
    result.hook = None
    result.refused = False
    hook.keep = (xv, tv, recv_x, recv_scales, recv_count, recv_src_info, recv_layout_range, stream, count_view,
                 wait_view)
    return result


cdef object _result_book(Communicator comm, handle, str what):
    """The communicator's book, once `handle` is a dispatch result of `comm` whose buffer set no later dispatch took
    (`what` names the use in the error)."""
    book = _ll_book(comm)
    if not isinstance(handle, LowLatencyDispatchResult):
        raise DeepEPInvalidArgument(
            f"handle must be the LowLatencyDispatchResult of a low-latency dispatch, not {type(handle).__name__}", 1)
    if handle.comm is not comm:
        raise DeepEPInvalidUsage("the dispatch result belongs to another communicator", 2)
    book.check_current(handle, what)
    return book


cdef object _combine_book(Communicator comm, handle):
    """The checks a low-latency combine passes before it can be refused on this rank (until it has a buffer set,
    there is nothing to refuse: any failure raises alone); the communicator's book."""
    book = _result_book(comm, handle, "low-latency combine")
    book.check_not_pending(handle.buffer_set, "a combine")
    return book


def _refuse_low_latency_combine(Communicator comm, handle, bint return_recv_hook, stream):
    """This rank's side of a low-latency combine of `handle` that a wrapper (the DeepEP adapter) refused before
    pydeepep had the call: it runs without data, as for a combine pydeepep refuses. Raises instead, refusing nothing,
    where pydeepep could not refuse it either (a handle that is no current dispatch result of `comm`, a receive hook
    due on its buffer set, a stream that is no stream)."""
    cdef size_t s
    with _InCall(comm, "refusing a low-latency combine"):
        _combine_book(comm, handle)
        s = stream_handle(stream)
        _refuse_low_latency(comm._live(), 1, handle.buffer_set, _phase(return_recv_hook), s)


def _low_latency_combine(Communicator comm, x, topk_idx, topk_weights, handle, bint zero_copy,
                         bint return_recv_hook, stream, out, stats_wait_ns=None):
    book = _combine_book(comm, handle)
    cdef deepepComm_t c = comm._live()
    cdef int buffer_set = handle.buffer_set
    cdef size_t s = comm._last_stream  # where the refusal runs if `stream` cannot be read
    cdef _LowLatencyHook hook = _LowLatencyHook.__new__(_LowLatencyHook)
    _check(deepepLowLatencyCombineArgsInit(&hook.combine_args, sizeof(hook.combine_args)))
    hook.combine_args.buffer_set = buffer_set
    hook.combine_args.phase = _phase(return_recv_hook)
    try:
        s = comm._call_stream(stream)
    except BaseException:
        _refuse_low_latency(c, 1, buffer_set, hook.combine_args.phase, s)
        raise
    # A combine this rank cannot make, whose set the other ranks' combine is on: its side runs without data, so that
    # theirs ends at once. (The library does the same for a result whose routing arrays a later call wrote.)
    if handle.refused:
        _refuse_low_latency(c, 1, buffer_set, hook.combine_args.phase, s)
        raise DeepEPInvalidUsage(
            "low-latency combine of a dispatch that was refused on this rank: this rank's side of the combine ran "
            "without data (the other ranks leave this rank's experts out and report it), and there is no output", 2)
    try:
        out_x = _low_latency_combine_call(comm, hook, s, x, topk_idx, topk_weights, handle, zero_copy, stream, out,
                                          stats_wait_ns)
    except BaseException:
        # Refused on this rank: its side of the call still runs, without data.
        if not hook.handed:
            _refuse_low_latency(c, 1, buffer_set, hook.combine_args.phase, s)
        raise
    if not return_recv_hook:
        return LowLatencyCombineResult(out_x, None)
    hook.arm("combine", comm, book, buffer_set, handle.generation, s, (out_x,))
    return LowLatencyCombineResult(out_x, hook)


def _low_latency_combine_call(Communicator comm, _LowLatencyHook hook, size_t s, x, topk_idx, topk_weights, handle,
                              bint zero_copy, stream, out, stats_wait_ns):
    """The checks and the library call of _low_latency_combine, into hook.combine_args; returns the output."""
    cdef deepepComm_t c = comm._live()
    cdef int T = comm._ll.max_tokens
    # The dispatch's routing arrays are read on this stream: after the dispatch wrote them, and freed only once read.
    for routing in (handle.recv_src_info, handle.recv_layout_range):
        if not isinstance(routing, DeviceArray):
            continue
        if (<DeviceArray>routing).stream != s:
            _make_stream_wait((<DeviceArray>routing).stream, s)
            routing.record_stream(stream)  # the object: the free waits on it, so it must outlive the array
        _keep_for_call(routing, s)  # a dispatch's out= arrays of another library, which record_stream cannot keep
    cdef int R = comm.nranks
    cdef int local = handle.num_experts // R
    cdef int64_t rows = <int64_t>R * T
    cdef int64_t hidden
    cdef size_t x_ptr = 0
    keep_x = None
    if zero_copy:
        if x is not None:
            raise DeepEPInvalidArgument("x is given with zero_copy=True (the rows are read from the combine buffer)",
                                        1)
        hidden = handle.hidden
    else:
        if x is None:
            raise DeepEPInvalidArgument("x is missing (pass the expert outputs, or zero_copy=True)", 1)
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 3:
            raise DeepEPInvalidArgument(f"x has shape {shape}; it must be [{local}, {rows}, hidden]", 1)
        hidden = _c_int("hidden (x.shape[2])", shape[2], 1)
        x_ptr, keep_x = _array3(x, s, "x", (local, rows, hidden), ("bfloat16",), comm.device)
    cdef _View tv = _ll_routing(comm, topk_idx, s, handle.num_tokens, T)
    if tv.cols != handle.num_topk:
        raise DeepEPInvalidArgument(f"topk_idx has {tv.cols} columns but the dispatch had {handle.num_topk}", 1)
    cdef _View wv = _matrix(topk_weights, s, "topk_weights", (np.float32,), comm.device)
    if wv.rows != tv.rows or wv.cols != tv.cols:
        raise DeepEPInvalidArgument(f"topk_weights has shape {(wv.rows, wv.cols)}; {(tv.rows, tv.cols)} is needed",
                                    1)
    if out is None:
        out_x = empty((tv.rows, hidden), "bfloat16", device=comm.device, stream=stream)
    else:
        given = out[0] if isinstance(out, tuple) else out
        # As for a dispatch's out=: an array a due receive writes is refused before _expect takes it over.
        comm._ll.check_out_arrays(handle.buffer_set, (given,), True)
        out_x = _expect(given, (tv.rows, hidden), np.uint16, "out", stream, comm.device)
        comm._ll.check_out_arrays(handle.buffer_set, (out_x,))
    wait_ptr, wait_view, _ = _stats_array(stats_wait_ns, stream, "stats_wait_ns", R)

    cdef deepepLowLatencyCombineArgs* a = &hook.combine_args
    a.x = <const void*>x_ptr
    a.zero_copy = 1 if zero_copy else 0
    a.hidden = <int>hidden
    a.num_experts = handle.num_experts
    a.src_info = <const int32_t*><size_t>handle.recv_src_info.ptr
    a.layout_range = <const int32_t*><size_t>handle.recv_layout_range.ptr
    a.num_tokens = tv.rows
    a.topk_idx = <const void*><size_t>tv.ptr
    a.topk_type = deepepInt64 if tv.kind == "int64" else deepepInt32
    a.num_topk = <int>tv.cols
    a.topk_row_stride = tv.stride
    a.topk_weights = <const float*><size_t>wv.ptr
    a.weights_row_stride = wv.stride
    a.out = <void*><size_t>out_x.ptr
    a.stats_wait_ns = <int64_t*><size_t>wait_ptr
    cdef deepepResult_t status
    hook.handed = True
    with nogil:
        status = deepepLowLatencyCombine(c, a, <CUstream_st*>s)
    _check(status)
    hook.keep = (keep_x, tv, wv, out_x, handle, stream, wait_view)
    return out_x


def _low_latency_combine_buffer(Communicator comm, handle):
    book = _result_book(comm, handle, "low-latency combine buffer")
    if handle.refused:
        raise DeepEPInvalidUsage("the dispatch of this result was refused on this rank: it has no combine buffer", 2)
    book.check_not_pending(handle.buffer_set, "the combine buffer is asked for")
    cdef void* pointer = NULL
    _check(deepepLowLatencyGetCombineBuffer(comm._live(), handle.buffer_set, handle.hidden, handle.num_experts,
                                            &pointer))
    cdef int local = handle.num_experts // comm.nranks
    cdef DeviceArray view = DeviceArray(<size_t>pointer, (local, comm.nranks * book.max_tokens, handle.hidden),
                                        "bfloat16", comm.device, handle.recv_x.stream)
    view._base = comm  # library memory: lives as long as the communicator's buffer
    view._stream_owner = handle.recv_x._stream_owner  # the stream it exports, kept alive as recv_x keeps it
    return view
