"""A drop-in for code written against DeepEP's ``deep_ep.Buffer`` on PyTorch tensors: ``import pydeepep.torch as
deep_ep``. Importable only where PyTorch is installed; the core never imports it.

Same names, arguments and return tuples as DeepEP V1 (../shared/docs/COMPAT.md) for the layout and the
high-throughput calls. Tensors go in and out through DLPack without copies or host synchronisations beyond what the
call itself needs (the exact-size dispatch waits once for the receive count, as DeepEP does). The low-latency calls
are refused with a clear error until pydeepep's low-latency mode exists.
"""

from __future__ import annotations

import os

import torch
import torch.utils.dlpack

import pydeepep
from pydeepep import bootstrap
from pydeepep.errors import DeepEPInvalidArgument, DeepEPNotSupported

__all__ = ["Buffer", "Config", "EventOverlap", "topk_idx_t"]

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


def _bits(tensor):
    """bfloat16 / float8 tensors as their raw bits (a view), which every DLPack consumer understands."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16)
    if _TORCH_TYPES["float8_e4m3fn"] is not None and tensor.dtype == _TORCH_TYPES["float8_e4m3fn"]:
        return tensor.view(torch.uint8)
    return tensor


class Buffer:
    """The communication buffer of one process group (collective creation and destruction)."""

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
        if low_latency_mode:
            raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)
        if allow_mnnvl or use_fabric:
            raise DeepEPNotSupported("multi-node NVLink (allow_mnnvl / use_fabric) is not supported", 8)
        if comm is not None:
            raise DeepEPNotSupported("comm= (an existing communicator) is not supported; pass the process group", 8)
        self.group = group
        self.explicitly_destroy = explicitly_destroy
        info = bootstrap.from_torch_distributed(group, device=torch.cuda.current_device())
        self.rank, self.group_size = info.rank, info.nranks
        buffer_bytes = max(int(num_nvl_bytes), 0)
        minimum = pydeepep.buffer_size_hint(info.nranks, max_tokens_per_rank=1, hidden=8, num_topk=1)
        # DeepEP sizes buffers in bytes, not tokens: accept any size that holds at least a few rows per rank.
        self.comm = pydeepep.Communicator(
            info.unique_id,
            info.rank,
            info.nranks,
            device=info.device,
            buffer_bytes=max(buffer_bytes, minimum + info.nranks * (64 << 10)) if buffer_bytes else 0,
            max_tokens_per_rank=int(os.environ.get("DEEPEP_MAX_TOKENS_PER_RANK", 16384)),
        )

    # ---- lifetime and statics -------------------------------------------------------------------------------------

    def destroy(self) -> None:
        self.comm.close()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if new_num_sms < 1:
            raise DeepEPInvalidArgument(f"num_sms is {new_num_sms}; it must be positive", 1)
        Buffer.num_sms = new_num_sms

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
    def get_low_latency_rdma_size_hint(max_tokens: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    def get_comm_stream(self):
        return torch.cuda.ExternalStream(self.comm.stream)

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
        stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
        if event is not None:
            event.wait(self.comm if async_finish else stream)
        if async_finish:
            pydeepep.Event.record(stream).wait(self.comm)
        run_on = self.comm if async_finish else stream
        per_rank, per_expert, in_rank = self.comm.get_dispatch_layout(topk_idx, num_experts, stream=run_on)
        done = EventOverlap(pydeepep.Event.record(self.comm.stream)) if async_finish else EventOverlap()
        return _to_torch(per_rank), None, _to_torch(per_expert), _to_torch(in_rank), done

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
        stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
        fp8 = isinstance(x, tuple)
        payload, scales = (x[0], x[1]) if fp8 else (x, None)
        num_experts = None
        if handle is None or num_worst_tokens > 0:
            if num_tokens_per_expert is None or topk_idx is None:
                raise DeepEPInvalidArgument("a dispatch without a handle needs topk_idx and num_tokens_per_expert", 1)
            num_experts = num_tokens_per_expert.numel()
        result = self.comm.dispatch(
            _bits(payload),
            x_scales=scales,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            num_experts=num_experts,
            handle=handle,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            num_sms=(config or Config(Buffer.num_sms)).num_sms,
            stream=stream,
            previous_event=event,
            async_finish=async_finish,
        )
        recv_x = _to_torch(result.recv_x)
        if fp8:
            recv_x = (recv_x, _to_torch(result.recv_scales))
        return (
            recv_x,
            _to_torch(result.recv_topk_idx),
            _to_torch(result.recv_topk_weights),
            result.num_recv_tokens_per_expert,
            result.handle,
            EventOverlap(result.event),
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
        stream, event = self._run_stream(previous_event, async_finish, allocate_on_comm_stream)
        biases = None if bias is None else tuple(_bits(b) for b in (bias if isinstance(bias, tuple) else (bias,)))
        result = self.comm.combine(
            _bits(x),
            handle,
            topk_weights=topk_weights,
            bias=biases,
            stream=stream,
            previous_event=event,
            async_finish=async_finish,
        )
        return _to_torch(result.out), _to_torch(result.topk_weights), EventOverlap(result.event)

    # ---- low-latency calls (not yet available) ----------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts):
        raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)

    def low_latency_dispatch(self, *args, **kwargs):
        raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)

    def low_latency_combine(self, *args, **kwargs):
        raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)

    def get_next_low_latency_combine_buffer(self, handle):
        raise DeepEPNotSupported("low-latency mode is not available in pydeepep yet", 8)
