"""Type stub of the Cython extension pydeepep._core (the thin layer over include/deepep/deepep.h)."""

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

def version() -> tuple[int, int, int]: ...
def error_string(status: int) -> str: ...
def get_unique_id() -> bytes: ...
def buffer_size_hint(
    nranks: int,
    *,
    buffer_bytes: int = ...,
    max_tokens_per_rank: int = ...,
    hidden: int = ...,
    num_topk: int = ...,
    num_experts: int = ...,
    low_latency_max_tokens: int = ...,
    zero_copy_dispatch: bool = ...,
) -> int: ...
def empty(shape: tuple[int, ...], dtype: Any, *, device: int, stream: Any = ...) -> DeviceArray: ...
def empty_cache(device: int | None = ...) -> None: ...
def to_device(array: np.ndarray, *, device: int, stream: Any = ...) -> DeviceArray: ...

class DeviceArray:
    shape: tuple[int, ...]
    dtype: np.dtype
    dtype_name: str
    ptr: int
    device_id: int
    stream: int
    def __init__(
        self, ptr: int, shape: tuple[int, ...], dtype: Any, device_id: int, stream: Any, owner: Any = ...
    ) -> None: ...
    @property
    def strides(self) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def __cuda_array_interface__(self) -> dict[str, Any]: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def __dlpack__(
        self, *, stream: Any = ..., max_version: tuple[int, int] | None = ..., dl_device: Any = ..., copy: Any = ...
    ) -> Any: ...
    def bits(self) -> DeviceArray: ...
    def record_stream(self, stream: Any) -> None: ...
    def to_numpy(self) -> np.ndarray: ...

class Event:
    handle: int
    @staticmethod
    def record(stream: int) -> Event: ...
    def wait(self, stream: Any = ...) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool: ...

class DispatchResult(NamedTuple):
    recv_x: DeviceArray
    recv_scales: DeviceArray | None
    recv_topk_idx: DeviceArray | None
    recv_topk_weights: DeviceArray | None
    num_recv_tokens_per_expert: list[int]
    recv_src_idx: DeviceArray
    handle: Handle
    event: Event | None

class CombineResult(NamedTuple):
    out: DeviceArray
    topk_weights: DeviceArray | None
    event: Event | None

class LowLatencyDispatchResult:
    recv_x: DeviceArray
    recv_scales: DeviceArray | None
    recv_count: DeviceArray
    recv_src_info: DeviceArray
    recv_layout_range: DeviceArray
    hook: Callable[[], None] | None
    buffer_set: int
    generation: int
    num_experts: int
    num_tokens: int
    num_topk: int
    hidden: int
    use_fp8: bool
    comm: Communicator
    refused: bool

class LowLatencyCombineResult(NamedTuple):
    out: DeviceArray
    hook: Callable[[], None] | None

class Handle:
    comm: Communicator
    num_recv_rows: int | None
    num_recv_tokens_per_expert: list[int]
    num_experts: int | None
    num_tokens: int | None
    def __init__(self, comm: Communicator) -> None: ...
    def close(self) -> None: ...

class RefusedHandle:
    comm: Communicator
    handle: Handle | None
    num_sms: int
    def __init__(self, comm: Communicator, handle: Handle | None, num_sms: int) -> None: ...

class Communicator:
    rank: int
    nranks: int
    device: int
    ranks_per_nvl_domain: int
    buffer_bytes: int
    zero_copy_dispatch: bool
    def __init__(
        self,
        unique_id: bytes,
        rank: int,
        nranks: int,
        *,
        device: int | None = ...,
        timeout: float = ...,
        buffer_bytes: int = ...,
        max_tokens_per_rank: int = ...,
        hidden: int = ...,
        num_topk: int = ...,
        num_experts: int = ...,
        allow_nvlink_multicast: bool = ...,
        low_latency_max_tokens: int = ...,
        low_latency_transport: str = ...,
        zero_copy_dispatch: bool = ...,
    ) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def stream(self) -> int: ...
    def __cuda_stream__(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Communicator: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool: ...
    def measure_push_bandwidth(
        self, num_sms: int, nbytes: int = ..., iterations: int = ..., stream: Any = ...
    ) -> float: ...
    def measure_flag_round(self, iterations: int = ..., stream: Any = ...) -> float: ...
    def check_async_error(self) -> None: ...
    def clear_async_error(self) -> None: ...
    def get_dispatch_layout(
        self, topk_idx: Any, num_experts: int, stream: Any = ..., out: Any = ...
    ) -> tuple[DeviceArray, DeviceArray, DeviceArray]: ...
    def dispatch(
        self,
        x: Any,
        *,
        topk_idx: Any = ...,
        topk_weights: Any = ...,
        num_experts: int | None = ...,
        x_scales: Any = ...,
        handle: Handle | None = ...,
        expert_alignment: int = ...,
        num_worst_tokens: int = ...,
        max_recv_tokens: int | None = ...,
        num_sms: int = ...,
        stream: Any = ...,
        out: DispatchResult | Callable[[int], Any] | None = ...,
        previous_event: Any = ...,
        async_finish: bool = ...,
    ) -> DispatchResult: ...
    def combine(
        self,
        x: Any,
        handle: Handle | RefusedHandle,
        *,
        topk_weights: Any = ...,
        bias: Any = ...,
        stream: Any = ...,
        out: CombineResult | tuple[Any, Any] | Callable[[int], Any] | None = ...,
        previous_event: Any = ...,
        async_finish: bool = ...,
    ) -> CombineResult: ...
    def low_latency_mask_rank(self, rank: int, masked: bool = ...) -> None: ...
    def low_latency_masked_ranks(self) -> list[bool]: ...
    def low_latency_timeline(self) -> Any: ...
    def low_latency_dispatch(
        self,
        x: Any,
        topk_idx: Any,
        num_experts: int,
        *,
        use_fp8: bool = ...,
        round_scale: bool = ...,
        use_ue8m0: bool = ...,
        return_recv_hook: bool = ...,
        stream: Any = ...,
        out: LowLatencyDispatchResult | None = ...,
        stats_recv_count: Any = ...,
        stats_wait_ns: Any = ...,
        scales_token_contiguous: bool = ...,
    ) -> LowLatencyDispatchResult: ...
    def low_latency_combine(
        self,
        x: Any,
        topk_idx: Any,
        topk_weights: Any,
        handle: LowLatencyDispatchResult,
        *,
        zero_copy: bool = ...,
        return_recv_hook: bool = ...,
        stream: Any = ...,
        out: Any = ...,
        stats_wait_ns: Any = ...,
    ) -> LowLatencyCombineResult: ...
    def low_latency_combine_buffer(self, handle: LowLatencyDispatchResult) -> DeviceArray: ...
