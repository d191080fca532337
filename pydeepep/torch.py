"""A drop-in for code written against DeepEP's ``deep_ep.Buffer`` on PyTorch tensors: ``import pydeepep.torch as
deep_ep``. Importable only where PyTorch is installed; the core never imports it.

Same names, arguments and return tuples as DeepEP V1 (docs/adapter.md in the repository) for the layout,
high-throughput and low-latency calls. Tensors go in and out through DLPack without copies or host synchronisations
beyond what the call itself needs (the exact-size dispatch waits once for the receive count, as DeepEP does).

Low-latency mode: pydeepep sizes its low-latency area when the communicator is created, DeepEP only learns the sizes
at call time. A ``Buffer(..., low_latency_mode=True)`` therefore creates its communicator on its first call (a
collective, like every low-latency call): a low-latency call or ``clean_low_latency_buffer`` sizes the area from its
arguments (T, hidden, num_topk, num_experts); later calls may use those sizes or smaller ones. That first call cannot
be captured in a CUDA graph: make one before capturing.
"""

from __future__ import annotations

import contextlib
import operator
import os
import types

import torch
import torch.utils.dlpack

import pydeepep
from pydeepep import bootstrap
from pydeepep.errors import DeepEPInvalidArgument, DeepEPInvalidUsage, DeepEPNotSupported, DeepEPRemoteError

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t"]

topk_idx_t = torch.int64

_TORCH_TYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None)}


class Config:
    """Performance settings of one call. Only ``num_sms`` matters here; the chunk sizes are accepted for
    compatibility (pydeepep's kernels size their chunks themselves)."""

    def __init__(
        self,
        num_sms: int = 20,
        num_max_nvl_chunked_send_tokens: int = 6,
        num_max_nvl_chunked_recv_tokens: int = 256,
        num_max_rdma_chunked_send_tokens: int = 6,
        num_max_rdma_chunked_recv_tokens: int = 256,
    ):
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of communication buffer for up to 4096 tokens per rank of `hidden_bytes` each (BF16 rows)."""
        return pydeepep.buffer_size_hint(num_ranks, max_tokens_per_rank=4096, hidden=max(8, hidden_bytes // 2))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0  # one NVLink domain: no RDMA buffer


class EventHandle:
    """DeepEP's ``deep_ep.utils.EventHandle``: an event recorded on PyTorch's current stream when made, so that
    ``EventOverlap(EventHandle())`` (as Megatron-Core writes it) can be waited on or passed as ``previous_event``."""

    def __init__(self):
        self.event = pydeepep.Event.record(torch.cuda.current_stream().cuda_stream)
        self.handle = self.event.handle  # the raw CUevent, which pydeepep's previous_event takes

    def wait(self, stream) -> None:
        self.event.wait(stream)

    def current_stream_wait(self) -> None:
        self.event.wait(torch.cuda.current_stream().cuda_stream)


class EventOverlap:
    """An event (or none) plus tensors to keep alive until it is waited for. ``current_stream_wait()`` makes
    PyTorch's current stream wait; as a context manager, the exit does the same."""

    def __init__(self, event=None, extra_tensors=None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            self.event.wait(torch.cuda.current_stream().cuda_stream)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.current_stream_wait()
        return False


def _to_torch(array):
    """A DeviceArray as a torch tensor over the same memory, without synchronising (the producing call decides when
    the data are ready: on the current stream, or at the returned event)."""
    if array is None:
        return None
    logical = _TORCH_TYPES.get(array.dtype_name)
    capsule = array.bits().__dlpack__(stream=-1) if logical is not None else array.__dlpack__(stream=-1)
    tensor = torch.utils.dlpack.from_dlpack(capsule)
    return tensor.view(logical) if logical is not None else tensor


def _contiguous_where_the_call_runs(comm, tensor, stream, event, async_finish: bool):
    """A contiguous copy of `tensor`, made on the stream a call of `comm` runs on and after the work it waits for:
    the caller's `stream` after `event`, or with `async_finish` the communicator's stream after `stream` and `event`,
    so that the caller's stream is not made to wait for `event` (the copy's memory then belongs to the
    communicator's stream, which reads it, and `tensor`, read there later than the caller's stream runs, is recorded
    on it: the caller may drop it at once)."""
    if not async_finish:
        if event is not None:
            pydeepep._core._wait_event(stream, event)
        return tensor.contiguous()
    pydeepep._core._make_stream_wait(stream, comm.stream)
    if event is not None:
        pydeepep._core._wait_event(comm.stream, event)
    comm_stream = torch.cuda.ExternalStream(comm.stream, device=comm.device)
    with torch.cuda.stream(comm_stream):
        copy = tensor.contiguous()
    tensor.record_stream(comm_stream)
    return copy


def _columns(tensor) -> int:
    """Columns of what must be a 2-D array (a tensor, or another array with a shape), 0 for anything else: the outputs
    are sized before the call, which then refuses that argument itself (on every rank, where it is collective)."""
    shape = getattr(tensor, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 2 else 0


def _num_sms_of(config):
    """The SM count a high-throughput call's ``config`` gives, for its refusal (None where it gives none readable:
    pydeepep then refuses on the default)."""
    return getattr(config, "num_sms", None) if config is not None else Buffer.num_sms


def _plain(tensor):
    """A tensor as pydeepep takes it: detached (a view; PyTorch exports no tensor that requires grad, and Megatron-Core
    dispatches its router's probabilities inside an autograd Function), bfloat16 / float8 as their raw bits, which
    every DLPack consumer understands. Anything else (None, another library's array) as it is."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if tensor.requires_grad:  # only then: detach() makes a new tensor object on every call's hot path
        tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16)
    if _TORCH_TYPES["float8_e4m3fn"] is not None and tensor.dtype == _TORCH_TYPES["float8_e4m3fn"]:
        return tensor.view(torch.uint8)
    return tensor


def _positive_num_sms(num_sms):
    """``num_sms`` as a positive int (pydeepep reads 0 as its default count, which is neither the Config's nor
    Buffer.num_sms)."""
    value = operator.index(num_sms)
    if value < 1:
        raise DeepEPInvalidArgument(f"num_sms is {num_sms}; it must be positive", 1)
    return value


def _check_low_latency_area(tokens, hidden, num_experts):
    """A low-latency area's sizes, each at least 1 (pydeepep makes no area for 0 tokens)."""
    for name, value in (("num_max_dispatch_tokens_per_rank", tokens), ("hidden", hidden), ("num_experts", num_experts)):
        if operator.index(value) < 1:
            raise DeepEPInvalidArgument(f"{name} is {value}; it must be at least 1", 1)


# The low-latency sizes (T, hidden, num_topk, num_experts), named as DeepEP's arguments name them.
_LL_FIELDS = ("num_max_dispatch_tokens_per_rank", "hidden", "num_topk", "num_experts")
# num_topk of a low-latency area sized by clean_low_latency_buffer, which does not name it (DeepEP's usual top-k).
_DEFAULT_LL_TOPK = 8


def _capturing() -> bool:
    """Whether PyTorch's current stream is capturing a CUDA graph (False where CUDA is absent)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _width(tensor, name: str) -> int:
    """Columns of a 2-D tensor."""
    if tensor.dim() != 2:
        raise DeepEPInvalidArgument(f"{name} has shape {tuple(tensor.shape)}; it must be 2-D", 1)
    return tensor.shape[1]


def _refuse_first_call_in_capture() -> None:
    if _capturing():
        raise DeepEPInvalidUsage(
            "the first call on a low_latency_mode Buffer creates its communicator, which is collective and cannot "
            "be captured in a CUDA graph: make one low-latency call (or clean_low_latency_buffer) before capturing",
            2,
        )


def _check_phases(async_finish: bool, return_recv_hook: bool) -> None:
    if async_finish and return_recv_hook:
        raise DeepEPInvalidArgument(
            "async_finish and return_recv_hook cannot be combined: the hook receives on the current stream", 1
        )


def _output(tensor, device: int, stream):
    """A caller's output tensor as a DeviceArray over its memory (no copy). pydeepep writes `out=` arrays through
    their pointer, so the tensor must be contiguous bfloat16 on the communicator's device; the shape is checked by
    the call."""
    if not (
        isinstance(tensor, torch.Tensor)
        and tensor.dtype == torch.bfloat16
        and tensor.is_cuda
        and tensor.device.index == device
        and tensor.is_contiguous()
    ):
        described = (
            f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}, contiguous={tensor.is_contiguous()}"
            if isinstance(tensor, torch.Tensor)
            else type(tensor).__name__
        )
        raise DeepEPInvalidArgument(f"out must be a contiguous bfloat16 tensor on cuda:{device}; got {described}", 1)
    return _device_array(tensor, "bfloat16", device, stream)


def _device_array(tensor, dtype_name: str, device: int, stream):
    """A contiguous tensor as a pydeepep DeviceArray over the same memory (kept alive by it), produced on `stream`."""
    return pydeepep.DeviceArray(tensor.data_ptr(), tuple(tensor.shape), dtype_name, device, stream, owner=tensor)


# pydeepep's element names of the tensor types the adapter allocates (uint8 holds FP8 payloads' bits).
_ELEMENT_NAMES = {
    torch.uint8: "float8_e4m3fn",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.bool: "bool",
}
if _TORCH_TYPES["float8_e4m3fn"] is not None:
    _ELEMENT_NAMES[_TORCH_TYPES["float8_e4m3fn"]] = "float8_e4m3fn"


def _torch_outputs(device: int, stream, **specs):
    """A call's outputs as new PyTorch tensors, wrapped for pydeepep's ``out=`` (``.tensors`` names them; a spec of
    None gives None). PyTorch's allocator serves them, as with DeepEP: ``Tensor.record_stream`` then works on them (it
    does nothing for memory PyTorch did not allocate, such as pydeepep's own outputs), and inside a capture they come
    from the graph's pool (allocations of pydeepep's own made inside a capture would be graph allocations, which
    forbid replaying the graph). specs: name -> (shape, dtype) or None."""
    tensors, arrays = {}, {}
    for name, spec in specs.items():
        if spec is None:
            arrays[name] = None
            continue
        tensors[name] = torch.empty(spec[0], dtype=spec[1], device=f"cuda:{device}")
        arrays[name] = _device_array(tensors[name], _ELEMENT_NAMES[spec[1]], device, stream)
    return types.SimpleNamespace(**arrays, tensors=tensors)


def _ll_dispatch_outputs(comm, tokens, num_experts, hidden, use_fp8, use_ue8m0, stream):
    """The outputs of a low-latency dispatch as PyTorch tensors, wrapped for pydeepep's ``out=``."""
    local, rows = num_experts // comm.nranks, comm.nranks * tokens
    columns = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
    return _torch_outputs(
        comm.device,
        stream,
        recv_x=((local, rows, hidden), torch.uint8 if use_fp8 else torch.bfloat16),
        recv_scales=((local, columns, rows), torch.int32 if use_ue8m0 else torch.float32) if use_fp8 else None,
        recv_count=((local,), torch.int32),
        recv_src_info=((local, rows), torch.int32),
        recv_layout_range=((local, comm.nranks, 2), torch.int32),
    )


class Buffer:
    """The communication buffer of one process group (collective creation and destruction). With
    ``low_latency_mode`` the communicator is created by the Buffer's first call (see the module docstring)."""

    num_sms = 24

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm=None,
    ):
        # allow_mnnvl only permits multi-node NVLink, which one NVLink domain never uses (and ranks beyond it are
        # refused by the calls that need NVLink): accepted. use_fabric changes how the buffer is allocated: refused.
        if use_fabric:
            raise DeepEPNotSupported("multi-node NVLink fabric memory (use_fabric) is not supported", 8)
        if comm is not None:
            raise DeepEPNotSupported("comm= (an existing communicator) is not supported; pass the process group", 8)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if operator.index(value) < 0:
                raise DeepEPInvalidArgument(f"{name} is {value}; it must be 0 or more (bytes)", 1)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise DeepEPInvalidArgument("torch.distributed is not initialised (call init_process_group first)", 1)
        self.group = group
        self.explicitly_destroy = explicitly_destroy
        self.low_latency_mode = bool(low_latency_mode)
        self.num_nvl_bytes = operator.index(num_nvl_bytes)
        self.num_rdma_bytes = operator.index(num_rdma_bytes)  # kept for code that reads it (Megatron-Core); unused
        self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
        # The device current now is the Buffer's (as with DeepEP), also when the communicator comes later.
        self._device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.comm = None
        self._ll_sizes = None  # (T, hidden, num_topk, num_experts) of the communicator's low-latency area, if any
        # Per buffer set, the last low-latency dispatch's generation and the tensors of it that a combine reads: an
        # asynchronous combine records them on the communicator's stream.
        self._ll_combine_inputs = {}
        if not self.low_latency_mode:
            self._create_communicator(None)

    # ---- the communicator -----------------------------------------------------------------------------------------

    def _create_communicator(self, ll_sizes) -> None:
        """Creates the communicator (collective), with a low-latency area for `ll_sizes` (T, hidden, num_topk,
        num_experts) or none."""
        _refuse_first_call_in_capture()
        self.comm = self._new_communicator(ll_sizes)
        self._ll_sizes = ll_sizes
        self._ll_combine_inputs.clear()  # generations count again from the new communicator's

    def _new_communicator(self, ll_sizes):
        info = bootstrap.from_torch_distributed(self.group, device=self._device)
        minimum = pydeepep.buffer_size_hint(info.nranks, max_tokens_per_rank=1, hidden=8, num_topk=1)
        if self.num_nvl_bytes:
            # DeepEP sizes buffers in bytes, not tokens: accept any size that holds at least a few rows per rank.
            buffer_bytes = max(self.num_nvl_bytes, minimum + info.nranks * (64 << 10))
        elif self.low_latency_mode:
            # DeepEP code gives low-latency Buffers no NVLink bytes. A small high-throughput part (1 MiB per rank)
            # keeps high-throughput calls working (slowly) rather than sizing it for the largest workload.
            buffer_bytes = minimum + info.nranks * (1 << 20)
        else:
            buffer_bytes = 0  # sized from the workload
        workload = {}
        if ll_sizes is not None:
            tokens, hidden, num_topk, num_experts = ll_sizes
            workload = dict(low_latency_max_tokens=tokens, hidden=hidden, num_topk=num_topk, num_experts=num_experts)
        return pydeepep.Communicator(
            info.unique_id,
            info.rank,
            info.nranks,
            device=info.device,
            buffer_bytes=buffer_bytes,
            max_tokens_per_rank=int(os.environ.get("DEEPEP_MAX_TOKENS_PER_RANK", 16384)),
            **workload,
        )

    def _first_call_agreed(self, check):
        """``check()``: a call's checks that must pass before its communicator can be created, and what they return.
        On a low_latency_mode Buffer's first call, which creates the communicator collectively, the ranks first tell
        each other whether their checks passed: a rank refused there raises its error and the others raise
        DeepEPRemoteError naming it, instead of waiting in the creation until the process group's timeout. Later
        calls run ``check()`` alone (a refusal then reaches the peers through the communicator)."""
        if self.comm is not None:
            return check()
        _refuse_first_call_in_capture()  # before the exchange, which a capture would break
        import torch.distributed as dist

        try:
            value, problem = check(), None
        except Exception as exc:
            value, problem = None, exc
        said = [None] * self.group_size
        mine = None if problem is None else f"{type(problem).__name__}: {problem}"
        # An NCCL group moves the objects through GPU tensors on torch's current device: make it the Buffer's.
        with torch.cuda.device(self._device) if self._device is not None else contextlib.nullcontext():
            dist.all_gather_object(said, mine, group=self.group)
        if problem is not None:
            raise problem
        refused = [rank for rank, message in enumerate(said) if message is not None]
        if refused:
            raise DeepEPRemoteError(
                f"rank {refused[0]} refused this Buffer's first low-latency call, which creates the communicator "
                f"({said[refused[0]]}); no communicator was created"
            )
        return value

    def _communicator(self):
        """The communicator of a high-throughput call. In low-latency mode the first call creates it; before any
        low-latency call it has no low-latency area (the sizes are not known yet)."""
        if self.comm is None:
            self._create_communicator(None)
        return self.comm

    def _low_latency_communicator(self, sizes=None):
        """The communicator of a low-latency call needing `sizes` (T, hidden, num_topk, num_experts; None where the
        call does not say): created with an area of those sizes by the Buffer's first call, else checked against
        its area. Calls passing a handle (sizes None) need the communicator of an earlier dispatch."""
        if not self.low_latency_mode:
            raise DeepEPInvalidUsage("low-latency calls need a Buffer created with low_latency_mode=True", 2)
        if self.comm is None:
            if sizes is None:
                raise DeepEPInvalidUsage("no low-latency dispatch was made on this Buffer; pass the handle of one", 2)
            tokens, hidden, num_topk, num_experts = sizes
            self._create_communicator((tokens, hidden, _DEFAULT_LL_TOPK if num_topk is None else num_topk, num_experts))
        elif self._ll_sizes is None:
            raise DeepEPInvalidUsage(
                "this Buffer's communicator was created by a high-throughput call before any low-latency call, so it "
                "has no low-latency area (pydeepep sizes it when the communicator is created): on a low_latency_mode "
                "Buffer, call clean_low_latency_buffer(...) or a low-latency call before the first high-throughput "
                "call",
                2,
            )
        for name, wanted, held in zip(_LL_FIELDS, sizes or (None,) * 4, self._ll_sizes, strict=True):
            if wanted is not None and wanted > held:
                raise DeepEPInvalidArgument(
                    f"{name} is {wanted}, more than the {held} this Buffer's low-latency area was sized for by its "
                    "first low-latency call (or clean_low_latency_buffer); pydeepep cannot resize the area: make the "
                    "first call with the largest sizes",
                    1,
                )
        return self.comm

    # ---- lifetime and statics -------------------------------------------------------------------------------------

    def destroy(self) -> None:
        if self.comm is not None:
            self.comm.close()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        Buffer.num_sms = _positive_num_sms(new_num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(pydeepep.Event.record(torch.cuda.current_stream().cuda_stream))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Config(Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of communication buffer per rank for low-latency calls of these sizes (num_topk 8). A hint only:
        pydeepep sizes the area from the first low-latency call, whatever num_rdma_bytes says. The arguments have
        DeepEP's names: callers pass them by keyword (vLLM does)."""
        return pydeepep.buffer_size_hint(
            num_ranks,
            max_tokens_per_rank=1,
            hidden=hidden,
            num_topk=_DEFAULT_LL_TOPK,
            num_experts=num_experts,
            low_latency_max_tokens=num_max_dispatch_tokens_per_rank,
        )

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    def get_comm_stream(self):
        if self.comm is None:
            raise DeepEPInvalidUsage("this low_latency_mode Buffer has no communicator until its first call", 2)
        return torch.cuda.ExternalStream(self.comm.stream, device=self.comm.device)

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        raise DeepEPNotSupported("the communication buffer is not exposed as a tensor", 8)

    # ---- streams and events ---------------------------------------------------------------------------------------

    def _run_stream(self, previous_event, async_finish: bool, allocate_on_comm_stream: bool):
        """(stream to pass to pydeepep, previous event to wait for): the current stream, or the communicator's
        after the current stream's work when ``async_finish``."""
        if allocate_on_comm_stream and not async_finish:
            raise DeepEPInvalidArgument("allocate_on_comm_stream needs async_finish", 1)
        event = previous_event.event if isinstance(previous_event, EventOverlap) else previous_event
        return torch.cuda.current_stream().cuda_stream, event

    # ---- high-throughput calls ------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self, topk_idx, num_experts, previous_event=None, async_finish=False, allocate_on_comm_stream=False
    ):
        comm = self._communicator()
        stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
        if event is not None:  # any event type dispatch and combine take (pydeepep, PyTorch, CuPy, cuda.core)
            pydeepep._core._wait_event(comm.stream if async_finish else stream, event)
        if async_finish:
            pydeepep.Event.record(stream).wait(comm)
        run_on = comm if async_finish else stream
        outputs = _torch_outputs(
            comm.device,
            run_on,
            per_rank=((comm.nranks,), torch.int32),
            per_expert=((num_experts,), torch.int32),
            in_rank=((topk_idx.shape[0] if _columns(topk_idx) else 0, comm.nranks), torch.bool),
        )
        comm.get_dispatch_layout(
            _plain(topk_idx), num_experts, stream=run_on, out=(outputs.per_rank, outputs.per_expert, outputs.in_rank)
        )
        tensors = outputs.tensors
        done = self._async_done(async_finish, (topk_idx, *tensors.values()))
        return tensors["per_rank"], None, tensors["per_expert"], tensors["in_rank"], done

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Config | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        comm = self._communicator()  # collective where it creates the communicator: before anything may refuse
        try:
            stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
            fp8 = isinstance(x, tuple)
            payload, scales = (x[0], x[1]) if fp8 else (x, None)
            rows, columns = scales.shape if fp8 and scales.dim() == 2 else (0, 0)
            if (columns > 1 and scales.stride(1) != 1) or (rows > 1 and scales.stride(0) < columns):
                # Column-major scales (as DeepGEMM lays them out), or rows that overlap (one scale expanded over the
                # tokens): pydeepep reads separate rows of scales, so they are copied (N * H / 128 words) where the
                # call runs and after what it waits for; row-major ones, padded rows included, are read in place.
                scales = _contiguous_where_the_call_runs(comm, scales, stream, event, async_finish)
                event = None  # the copy waited for it, and the call runs after the copy on the same stream
            # The expert count, where the call routes (pydeepep refuses a missing topk_idx itself).
            num_experts = None if num_tokens_per_expert is None else num_tokens_per_expert.numel()
            payload_bits = _plain(payload)
            num_sms = _positive_num_sms((config or Config(Buffer.num_sms)).num_sms)
        except BaseException as exc:
            refused = self._refuse_high_throughput("dispatch", handle, num_worst_tokens, _num_sms_of(config))
            pydeepep._core._give_refused_handle(exc, refused)  # for the combine the other ranks make of it
            raise
        made = []

        def outputs(rows):
            # Called by the dispatch once it knows how many rows arrive (after the count exchange of an exact-size
            # dispatch), on the stream the call runs on.
            width = scales.shape[1] if fp8 else 0
            k = topk_idx.shape[1] if topk_idx is not None else 0
            made.append(
                _torch_outputs(
                    comm.device,
                    comm if async_finish else stream,
                    recv_x=((rows, payload.shape[1]), payload.dtype),
                    recv_scales=((rows, width), scales.dtype) if fp8 else None,
                    recv_topk_idx=((rows, k), torch.int64) if topk_idx is not None else None,
                    recv_topk_weights=((rows, k), torch.float32) if topk_weights is not None else None,
                    recv_src_idx=((rows,), torch.int32),
                )
            )
            return made[0]

        result = comm.dispatch(
            payload_bits,
            x_scales=_plain(scales),
            topk_idx=_plain(topk_idx),
            topk_weights=_plain(topk_weights),
            num_experts=num_experts,
            handle=handle,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            num_sms=num_sms,
            stream=stream,
            previous_event=event,
            async_finish=async_finish,
            out=outputs,
        )
        tensors = made[0].tensors
        done = self._async_done(async_finish, (payload, scales, topk_idx, topk_weights, *tensors.values()))
        recv_x = tensors["recv_x"]
        if fp8:
            recv_x = (recv_x, tensors["recv_scales"])
        return (
            recv_x,
            tensors.get("recv_topk_idx"),
            tensors.get("recv_topk_weights"),
            result.num_recv_tokens_per_expert,
            result.handle,
            done,
        )

    def combine(
        self,
        x,
        handle,
        topk_weights=None,
        bias=None,
        config: Config | None = None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        comm = self._communicator()  # collective where it creates the communicator: before anything may refuse
        try:
            stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
            # DeepEP takes one bias, or a pair of which either may be None.
            biases = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
            biases = tuple(b for b in biases if b is not None)
            x_bits, bias_bits = _plain(x), tuple(_plain(b) for b in biases) or None
        except BaseException:
            self._refuse_high_throughput("combine", handle, 0, None)
            raise
        made = []

        def outputs(rows):
            # Called by the combine with the handle's token count, on the stream the call runs on: a failed
            # allocation is then refused to the peers as any other refusal.
            made.append(
                _torch_outputs(
                    comm.device,
                    comm if async_finish else stream,
                    out=((rows, _columns(x)), torch.bfloat16),
                    topk_weights=((rows, _columns(topk_weights)), torch.float32) if topk_weights is not None else None,
                )
            )
            return made[0].out, made[0].topk_weights

        comm.combine(
            x_bits,
            handle,
            topk_weights=_plain(topk_weights),
            bias=bias_bits,
            stream=stream,
            previous_event=event,
            async_finish=async_finish,
            out=outputs,
        )
        tensors = made[0].tensors
        done = self._async_done(async_finish, (x, topk_weights, *biases, *tensors.values()))
        return tensors["out"], tensors.get("topk_weights"), done

    # ---- low-latency calls ----------------------------------------------------------------------------------------

    def _refuse_high_throughput(self, call: str, handle, num_worst_tokens, num_sms):
        """This rank's side of a high-throughput ``call`` ("dispatch" or "combine") the adapter refused before pydeepep
        had it (see _run_refusal); a refused dispatch's RefusedHandle, or None."""
        return self._run_refusal(pydeepep._core._refuse_high_throughput, call, handle, num_worst_tokens, num_sms)

    def _refuse_low_latency(self, refuse, *args, forked: bool = False) -> None:
        """This rank's side of a low-latency call the adapter refused before pydeepep had it (see _run_refusal):
        nothing runs before the Buffer's first low-latency call made its communicator (the peers are still creating
        theirs)."""
        if self.comm is None or self._ll_sizes is None:
            return
        self._run_refusal(refuse, *args, forked=forked)

    def _run_refusal(self, refuse, *args, forked: bool = False):
        """Runs ``refuse(comm, *args, stream)`` and returns what it returns (None where it failed): this rank's side
        of a call the adapter refused before pydeepep had it, so that the other ranks, already in the call, finish it
        at once with DeepEPRemoteError naming this rank instead of waiting out the timeout (pydeepep does the same for
        what it refuses itself). Nothing runs where pydeepep could not refuse the call either (a handle of no current
        dispatch, a receive hook due): the caller raises its own error in any case."""
        try:
            # After every call made so far on either stream (an async_finish call ran on the communicator's), as the
            # refused call would have been: the refusal reads where the sequence of calls stands. A capturing stream
            # can wait only for the communicator's stream that this call `forked` into the capture (which must join
            # back), not for one outside it.
            stream = torch.cuda.current_stream(self.comm.device).cuda_stream
            if forked or not _capturing():
                pydeepep.Event.record(self.comm.stream).wait(stream)
            return refuse(self.comm, *args, stream)
        except Exception:  # the caller's error is the one to report (raised next), not this one
            return None

    def _low_latency_stream(self, async_finish: bool):
        """Where a low-latency call runs: PyTorch's current stream, or with ``async_finish`` the communicator's,
        after the work already on the current stream (the Communicator is the stream object: arrays made on it
        keep it alive)."""
        current = torch.cuda.current_stream()
        if not async_finish:
            return current
        pydeepep.Event.record(current.cuda_stream).wait(self.comm)
        return self.comm

    def _async_done(self, async_finish: bool, tensors) -> EventOverlap:
        """The EventOverlap of a call. With ``async_finish`` (the call ran on the communicator's stream): an event on
        that stream, and the call's tensors (inputs, and outputs, which the current stream allocated: DeepEP's
        allocate_on_comm_stream=False) kept from reuse by PyTorch's allocator until that stream is done with them."""
        if not async_finish:
            return EventOverlap()
        stream = torch.cuda.ExternalStream(self.comm.stream, device=self.comm.device)
        kept = tuple(t for t in tensors if isinstance(t, torch.Tensor))
        for tensor in kept:
            tensor.record_stream(stream)
        return EventOverlap(pydeepep.Event.record(self.comm.stream), kept)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: pydeepep's low-latency calls tell fresh data from stale by sequence numbers, so no
        buffer needs zeroing. As the Buffer's first call, creates the communicator (collective) with an area of these
        sizes (num_topk 8); later, checks that the sizes fit the area."""
        self._first_call_agreed(lambda: _check_low_latency_area(num_max_dispatch_tokens_per_rank, hidden, num_experts))
        self._low_latency_communicator((num_max_dispatch_tokens_per_rank, hidden, None, num_experts))

    def low_latency_dispatch(
        self,
        x,
        topk_idx,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats=None,
        dispatch_wait_recv_cost_stats=None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ):
        """``(recv_x, recv_count [E_loc] int32, handle, EventOverlap, hook)``. ``recv_x``: with ``use_fp8`` a pair
        (float8_e4m3fn [E_loc, R*T, H], scales float32 [E_loc, R*T, H/128] or UE8M0-packed int32 [E_loc, R*T,
        ceil(H/512)], stored column-major), else bfloat16 [E_loc, R*T, H]; T is the low-latency area's (that of the
        first call). ``handle`` is pydeepep's LowLatencyDispatchResult; ``hook`` receives (with
        ``return_recv_hook``) or is None. The statistics tensors (int32/int64 [E_loc] rows received per local
        expert; int64 [R] nanoseconds waited per source rank) are added to."""
        handed = False  # whether pydeepep has the call (it refuses what it finds wrong itself)
        forked = False  # whether the call moved to the communicator's stream (async_finish)
        try:

            def sizes():
                _check_phases(async_finish, return_recv_hook)
                hidden = _width(x, "x")
                if x.shape[0] > num_max_dispatch_tokens_per_rank:
                    raise DeepEPInvalidArgument(
                        f"x has {x.shape[0]} tokens, more than num_max_dispatch_tokens_per_rank "
                        f"({num_max_dispatch_tokens_per_rank})",
                        1,
                    )
                _check_low_latency_area(num_max_dispatch_tokens_per_rank, hidden, num_experts)
                return (num_max_dispatch_tokens_per_rank, hidden, _width(topk_idx, "topk_idx"), num_experts)

            needed = self._first_call_agreed(sizes)
            hidden = needed[1]
            comm = self._low_latency_communicator(needed)
            stream = self._low_latency_stream(async_finish)
            forked = async_finish
            outputs = _ll_dispatch_outputs(comm, self._ll_sizes[0], num_experts, hidden, use_fp8, use_ue8m0, stream)
            x_bits = _plain(x)
            handed = True
            result = comm.low_latency_dispatch(
                x_bits,
                _plain(topk_idx),
                num_experts,
                use_fp8=use_fp8,
                # DeepEP ignores the scale options of a BF16 dispatch; pydeepep would refuse them.
                round_scale=bool(use_fp8 and round_scale),
                use_ue8m0=bool(use_fp8 and use_ue8m0),
                return_recv_hook=return_recv_hook,
                stream=stream,
                stats_recv_count=_plain(cumulative_local_expert_recv_stats),
                stats_wait_ns=_plain(dispatch_wait_recv_cost_stats),
                # DeepEP's scales are column-major: stored [E_loc, columns, R*T], returned transposed (a view).
                scales_token_contiguous=True,
                out=outputs,
            )
        except BaseException as exc:
            if not handed:
                self._refuse_low_latency(
                    pydeepep._core._refuse_low_latency_dispatch,
                    num_experts,
                    use_fp8,
                    return_recv_hook,
                    exc,
                    forked=forked,
                )
            refused = getattr(exc, "refused_result", None)
            if refused is not None:  # the refused dispatch took its buffer set: what a combine there reads is gone
                self._ll_combine_inputs.pop(refused.buffer_set, None)
            raise
        tensors = outputs.tensors
        layout = (tensors["recv_src_info"], tensors["recv_layout_range"])
        # A dispatch is named by its set and that set's generation, which no other dispatch of the communicator
        # shares (an object's id may name another result once this one is gone).
        self._ll_combine_inputs[result.buffer_set] = (result.generation, *layout)
        recv_x = tensors["recv_x"]
        if use_fp8:
            fp8 = _TORCH_TYPES["float8_e4m3fn"]  # None in PyTorch builds without float8: the bits stay uint8
            recv_x = (recv_x if fp8 is None else recv_x.view(fp8), tensors["recv_scales"].transpose(1, 2))
        done = self._async_done(
            async_finish,
            (x, topk_idx, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, *tensors.values()),
        )
        return recv_x, tensors["recv_count"], result, done, result.hook

    def low_latency_combine(
        self,
        x,
        topk_idx,
        topk_weights,
        handle,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out=None,
        combine_wait_recv_cost_stats=None,
    ):
        """``(combined_x [N, H] bfloat16, EventOverlap, hook)``. ``x`` [E_loc, R*T, H] bfloat16 in the layout of
        ``handle``; with ``zero_copy`` it is ignored (the rows are in get_next_low_latency_combine_buffer). ``out``: a
        contiguous bfloat16 tensor [N, H] to write and return. ``combine_wait_recv_cost_stats``: int64 [R] that gains
        the nanoseconds the receive waited for each rank's rows (as
        dispatch_wait_recv_cost_stats)."""
        forked = False  # whether the call moved to the communicator's stream (async_finish)
        try:
            if use_logfmt:
                raise DeepEPNotSupported(
                    "use_logfmt (LogFMT-compressed combine) is not supported: pydeepep sends BF16", 8
                )
            _check_phases(async_finish, return_recv_hook)
            comm = self._low_latency_communicator()
            stream = self._low_latency_stream(async_finish)
            forked = async_finish
            # A refused dispatch's result gets no output: pydeepep runs this rank's side of its combine and raises.
            refused = getattr(handle, "refused", False)
            if out is None and not refused:
                # PyTorch's allocator (its graph pool inside a capture), as for the dispatch's outputs.
                hidden = handle.hidden if zero_copy else x.shape[-1]
                out = torch.empty((topk_idx.shape[0], hidden), dtype=torch.bfloat16, device=f"cuda:{comm.device}")
            # DeepEP passes the combine buffer itself as x with zero_copy; pydeepep reads the buffer and wants no x.
            x_bits = None if zero_copy else _plain(x)
            out_array = None if out is None else _output(out, comm.device, stream)
        except BaseException:
            self._refuse_low_latency(
                pydeepep._core._refuse_low_latency_combine, handle, return_recv_hook, forked=forked
            )
            raise
        result = comm.low_latency_combine(
            x_bits,
            _plain(topk_idx),
            _plain(topk_weights),
            handle,
            zero_copy=zero_copy,
            return_recv_hook=return_recv_hook,
            stream=stream,
            out=out_array,
            stats_wait_ns=_plain(combine_wait_recv_cost_stats),
        )
        held = self._ll_combine_inputs.get(handle.buffer_set)
        layout = held[1:] if held is not None and held[0] == handle.generation else ()  # its src_info and ranges
        done = self._async_done(async_finish, (x, topk_idx, topk_weights, out, combine_wait_recv_cost_stats, *layout))
        return out, done, result.hook

    # ---- masking ranks out of low-latency calls (DeepEP's enable_shrink surface) --------------------------------

    def _masking_communicator(self, what: str):
        """The communicator whose low-latency mask `what` reads or changes; None before the Buffer's first low-latency
        call, when no rank is masked. The mask calls synchronise the device, which a capture cannot record."""
        if not self.low_latency_mode:
            raise DeepEPInvalidUsage(f"{what} needs a Buffer created with low_latency_mode=True", 2)
        if _capturing():
            raise DeepEPInvalidUsage(
                f"{what} while the current stream captures a CUDA graph: it synchronises the device (pydeepep's mask "
                "calls are not stream-ordered); call it outside the capture",
                2,
            )
        return None if self.comm is None else self._low_latency_communicator()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks ``rank_to_mask`` out of this rank's low-latency calls (``mask=True``: it is neither waited for nor
        written to, and slots naming its experts are skipped) or takes it back (``False``), whether or not the
        Buffer was made with ``enable_shrink`` (pydeepep can always mask). A low-latency call that times out waiting
        for a rank masks it by itself. Every surviving rank must mask the same ranks; take a rank back only while no
        rank has a low-latency call in flight, then meet (a barrier) before the next call. Blocking (synchronises the
        device)."""
        comm = self._masking_communicator("low_latency_update_mask_buffer")
        rank = operator.index(rank_to_mask)
        if not 0 <= rank < self.group_size:
            raise DeepEPInvalidArgument(f"rank_to_mask is {rank_to_mask}; it must be in [0, {self.group_size})", 1)
        if comm is None:
            if not mask:
                return  # no communicator yet: nothing is masked
            raise DeepEPInvalidUsage(
                "low_latency_update_mask_buffer before the Buffer's first low-latency call, which creates its "
                "communicator: make that call (or clean_low_latency_buffer) first",
                2,
            )
        comm.low_latency_mask_rank(rank, masked=bool(mask))  # taking this rank back does nothing; masking it is refused

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Writes into ``mask_status`` (an integer tensor of ``num_ranks`` elements) 1 for each rank this rank has
        masked, 0 for the others."""
        comm = self._masking_communicator("low_latency_query_mask_buffer")
        if not isinstance(mask_status, torch.Tensor) or mask_status.numel() != self.group_size:
            shape = tuple(mask_status.shape) if isinstance(mask_status, torch.Tensor) else type(mask_status).__name__
            raise DeepEPInvalidArgument(f"mask_status is {shape}; a tensor of {self.group_size} elements is needed", 1)
        kind = mask_status.dtype
        if kind.is_floating_point or kind.is_complex or kind == torch.bool:
            raise DeepEPInvalidArgument(f"mask_status has dtype {kind}; an integer dtype (int32) is needed", 1)
        masked = [False] * self.group_size if comm is None else comm.low_latency_masked_ranks()
        mask_status.copy_(torch.tensor(masked, dtype=mask_status.dtype).view(mask_status.shape))

    def low_latency_clean_mask_buffer(self) -> None:
        """Takes every masked rank back (as ``low_latency_update_mask_buffer(rank, False)`` does, with its rules)."""
        comm = self._masking_communicator("low_latency_clean_mask_buffer")
        if comm is None:
            return
        for rank, masked in enumerate(comm.low_latency_masked_ranks()):
            if masked:
                comm.low_latency_mask_rank(rank, masked=False)

    def get_next_low_latency_combine_buffer(self, handle):
        """The combine buffer of ``handle``'s dispatch, bfloat16 [E_loc, R*T, H] (a view of pydeepep's buffer): write
        the expert outputs there and combine with ``zero_copy=True``."""
        return _to_torch(self._low_latency_communicator().low_latency_combine_buffer(handle))
