"""CPU tier for the PyTorch adapter (skipped where torch is absent): the parts that need no GPU."""

import pytest

torch = pytest.importorskip("torch")

import pydeepep  # noqa: E402
import pydeepep.torch as deep_ep  # noqa: E402


def test_module_surface_matches_deepep():
    assert deep_ep.topk_idx_t is torch.int64
    for name in ("Buffer", "Config", "EventOverlap", "EventHandle"):
        assert hasattr(deep_ep, name)
    for method in (
        "get_dispatch_layout",
        "dispatch",
        "combine",
        "destroy",
        "get_comm_stream",
        "low_latency_dispatch",
        "low_latency_combine",
        "clean_low_latency_buffer",
        "get_next_low_latency_combine_buffer",
        "low_latency_update_mask_buffer",
        "low_latency_query_mask_buffer",
        "low_latency_clean_mask_buffer",
    ):
        assert callable(getattr(deep_ep.Buffer, method))


def test_config_defaults_and_size_hints():
    config = deep_ep.Config()
    assert (config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens) == (
        20,
        6,
        256,
    )
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8) == pydeepep.buffer_size_hint(
        8, max_tokens_per_rank=4096, hidden=7168
    )
    assert config.get_rdma_buffer_size_hint(7168 * 2, 8) == 0


def test_static_configuration():
    saved = deep_ep.Buffer.num_sms
    try:
        deep_ep.Buffer.set_num_sms(32)
        assert deep_ep.Buffer.get_dispatch_config(8).num_sms == 32
        assert deep_ep.Buffer.get_combine_config(8).num_sms == 32
        with pytest.raises(pydeepep.DeepEPInvalidArgument):
            deep_ep.Buffer.set_num_sms(0)
    finally:
        deep_ep.Buffer.num_sms = saved
    assert deep_ep.Buffer.is_sm90_compiled()


def test_event_overlap_without_an_event_is_a_no_op():
    overlap = deep_ep.EventOverlap(None, extra_tensors=(torch.zeros(1),))
    overlap.current_stream_wait()
    with overlap as inner:
        assert inner is overlap


def test_unsupported_modes_are_refused_before_any_communication():
    with pytest.raises(pydeepep.DeepEPNotSupported, match="use_fabric"):
        deep_ep.Buffer(None, allow_mnnvl=True, use_fabric=True)
    with pytest.raises(pydeepep.DeepEPNotSupported, match="comm="):
        deep_ep.Buffer(None, comm=object())


def test_a_buffer_needs_torch_distributed():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="init_process_group"):
        deep_ep.Buffer(None, low_latency_mode=True)


@pytest.mark.parametrize("name", ["num_nvl_bytes", "num_rdma_bytes"])
def test_a_negative_buffer_size_is_refused_naming_it(name):
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"{name} is -5"):
        deep_ep.Buffer(None, **{name: -5})
    with pytest.raises(TypeError):  # 0.9 bytes is no size (int() would make it 0: sized from the workload)
        deep_ep.Buffer(None, **{name: 0.9})


def test_low_latency_size_hint():
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert isinstance(hint, int) and hint > 0
    assert hint == pydeepep.buffer_size_hint(
        8, max_tokens_per_rank=1, hidden=7168, num_topk=8, num_experts=256, low_latency_max_tokens=128
    )
    assert hint > deep_ep.Buffer.get_low_latency_rdma_size_hint(64, 7168, 8, 256)
    # By keyword, with DeepEP's names, as vLLM calls it.
    assert hint == deep_ep.Buffer.get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank=128, hidden=7168, num_ranks=8, num_experts=256
    )


# ---- low-latency Buffers without a GPU: a world of one gloo rank, and a stand-in for the communicator -------------


class FakeCommunicator:
    """Stands in for pydeepep.Communicator where no GPU exists (the adapter's checks run before any call on it)."""

    device = 0

    def __init__(self, ll_sizes):
        self.ll_sizes = ll_sizes
        self.closed = False
        self.masked = []  # the low-latency mask, as long as a test makes it

    def close(self):
        self.closed = True

    def low_latency_masked_ranks(self):
        return list(self.masked)

    def low_latency_mask_rank(self, rank, masked=True):
        self.masked[rank] = masked


@pytest.fixture
def group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def created(monkeypatch):
    """The low-latency sizes of every communicator the adapter creates (with FakeCommunicator instead)."""
    made = []

    def fake(self, ll_sizes):
        made.append(ll_sizes)
        return FakeCommunicator(ll_sizes)

    monkeypatch.setattr(deep_ep.Buffer, "_new_communicator", fake)
    return made


def ll_inputs(tokens=4, hidden=1024, num_topk=8):
    return torch.zeros(tokens, hidden, dtype=torch.bfloat16), torch.zeros(tokens, num_topk, dtype=torch.int64)


def test_low_latency_buffer_creates_its_communicator_on_the_first_call(group, created):
    buffer = deep_ep.Buffer(group, 0, 1 << 20, low_latency_mode=True, num_qps_per_rank=16)
    assert buffer.comm is None and created == []
    buffer.clean_low_latency_buffer(128, 1024, 16)
    assert created == [(128, 1024, 8, 16)]  # num_topk 8: clean_low_latency_buffer does not name it
    buffer.clean_low_latency_buffer(64, 512, 16)  # fits: nothing to do
    assert len(created) == 1
    for sizes, name in (((0, 1024, 16), "num_max_dispatch_tokens_per_rank"), ((8, 1024, 0), "num_experts")):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"{name} is 0; it must be at least 1"):
            buffer.clean_low_latency_buffer(*sizes)
    x, topk = ll_inputs()
    too_large = [
        ((x, ll_inputs(num_topk=9)[1], 128, 16), "num_topk"),
        ((ll_inputs(hidden=2048)[0], topk, 128, 16), "hidden"),
        ((x, topk, 256, 16), "num_max_dispatch_tokens_per_rank"),
        ((x, topk, 128, 32), "num_experts"),
    ]
    for args, field in too_large:
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=f"^{field} is"):
            buffer.low_latency_dispatch(*args)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="^num_experts is 32"):
        buffer.clean_low_latency_buffer(128, 1024, 32)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="more than num_max_dispatch_tokens_per_rank"):
        buffer.low_latency_dispatch(*ll_inputs(tokens=65), 64, 16)
    assert len(created) == 1
    comm = buffer.comm
    buffer.destroy()
    assert comm.closed


def test_a_first_low_latency_call_with_no_tokens_creates_no_communicator(group, created):
    # pydeepep makes no low-latency area for 0 tokens: every later call would fail on its own.
    buffer = deep_ep.Buffer(group, 0, 1 << 20, low_latency_mode=True)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="num_max_dispatch_tokens_per_rank is 0"):
        buffer.clean_low_latency_buffer(0, 1024, 16)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="num_max_dispatch_tokens_per_rank is 0"):
        buffer.low_latency_dispatch(*ll_inputs(tokens=0), 0, 16)
    assert created == [] and buffer.comm is None


def test_the_first_low_latency_call_cannot_be_captured(group, created, monkeypatch):
    monkeypatch.setattr(deep_ep, "_capturing", lambda: True)
    buffer = deep_ep.Buffer(group, 0, 0, low_latency_mode=True)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="before capturing"):
        buffer.clean_low_latency_buffer(128, 1024, 16)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="before capturing"):
        buffer.low_latency_dispatch(*ll_inputs(), 128, 16)
    assert created == [] and buffer.comm is None


def test_a_high_throughput_call_first_leaves_no_low_latency_area(group, created):
    buffer = deep_ep.Buffer(group, 0, 0, low_latency_mode=True)
    buffer._communicator()  # what a high-throughput call does first
    assert created == [None]
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="clean_low_latency_buffer"):
        buffer.clean_low_latency_buffer(128, 1024, 16)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="clean_low_latency_buffer"):
        buffer.low_latency_dispatch(*ll_inputs(), 128, 16)


def test_the_mask_buffer_calls_map_onto_pydeepeps_masking(group, created):
    buffer = deep_ep.Buffer(group, 0, 0, low_latency_mode=True, enable_shrink=True)
    status = torch.full((1,), 7, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)  # before the first low-latency call nothing is masked
    assert status.tolist() == [0]
    buffer.low_latency_clean_mask_buffer()
    buffer.group_size = 3  # as on three ranks
    buffer.low_latency_update_mask_buffer(1)  # nothing is masked yet: nothing to take back
    with pytest.raises(TypeError):  # not rank 1
        buffer.low_latency_update_mask_buffer(1.7)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="first low-latency call"):
        buffer.low_latency_update_mask_buffer(1, True)
    assert created == []  # none of them made the communicator
    buffer.clean_low_latency_buffer(128, 1024, 16)
    buffer.comm.masked = [False] * 3
    buffer.low_latency_update_mask_buffer(2, True)
    buffer.low_latency_update_mask_buffer(1, mask=True)
    status = torch.full((3,), 7, dtype=torch.int64)
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 1, 1]
    buffer.low_latency_update_mask_buffer(1)  # mask=False by default: taken back
    buffer.low_latency_query_mask_buffer(status)
    assert status.tolist() == [0, 0, 1]
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=r"mask_status is \(2,\); a tensor of 3 elements"):
        buffer.low_latency_query_mask_buffer(torch.zeros(2, dtype=torch.int32))
    buffer.low_latency_clean_mask_buffer()
    assert buffer.comm.masked == [False] * 3
    for bad, message in (
        (lambda: buffer.low_latency_update_mask_buffer(3, True), r"rank_to_mask is 3; it must be in \[0, 3\)"),
        (lambda: buffer.low_latency_update_mask_buffer(-1), r"rank_to_mask is -1"),
        (lambda: buffer.low_latency_query_mask_buffer(torch.zeros(3)), "dtype torch.float32; an integer dtype"),
        (lambda: buffer.low_latency_query_mask_buffer(torch.zeros(3, dtype=torch.bool)), "dtype torch.bool"),
    ):
        with pytest.raises(pydeepep.DeepEPInvalidArgument, match=message):
            bad()
    assert buffer.comm.masked == [False] * 3


def test_the_mask_buffer_calls_are_refused_inside_a_capture(group, created, monkeypatch):
    buffer = deep_ep.Buffer(group, 0, 0, low_latency_mode=True)
    buffer.clean_low_latency_buffer(128, 1024, 16)
    buffer.comm.masked = [False]
    monkeypatch.setattr(deep_ep, "_capturing", lambda: True)
    for call in (
        lambda: buffer.low_latency_update_mask_buffer(0),
        lambda: buffer.low_latency_query_mask_buffer(torch.zeros(1, dtype=torch.int32)),
        buffer.low_latency_clean_mask_buffer,
    ):
        with pytest.raises(pydeepep.DeepEPInvalidUsage, match="captures a CUDA graph"):
            call()


def test_low_latency_calls_need_low_latency_mode(group, created):
    buffer = deep_ep.Buffer(group, 0, 0)
    assert created == [None]
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="low_latency_mode=True"):
        buffer.low_latency_dispatch(*ll_inputs(), 128, 16)
    for masking in (
        lambda: buffer.low_latency_update_mask_buffer(0, True),
        lambda: buffer.low_latency_query_mask_buffer(torch.zeros(1, dtype=torch.int32)),
        buffer.low_latency_clean_mask_buffer,
    ):
        with pytest.raises(pydeepep.DeepEPInvalidUsage, match="low_latency_mode=True"):
            masking()
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="low_latency_mode=True"):
        buffer.clean_low_latency_buffer(128, 1024, 16)


def test_low_latency_options_pydeepep_lacks_are_refused_before_any_communication(group, created):
    buffer = deep_ep.Buffer(group, 0, 0, low_latency_mode=True)
    x, topk = ll_inputs()
    weights = torch.zeros(4, 8)
    with pytest.raises(pydeepep.DeepEPNotSupported, match="use_logfmt"):
        buffer.low_latency_combine(x, topk, weights, None, use_logfmt=True)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="return_recv_hook"):
        buffer.low_latency_dispatch(x, topk, 128, 16, async_finish=True, return_recv_hook=True)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="no low-latency dispatch"):
        buffer.low_latency_combine(x, topk, weights, None)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="no low-latency dispatch"):
        buffer.get_next_low_latency_combine_buffer(None)
    with pytest.raises(pydeepep.DeepEPInvalidUsage, match="first call"):
        buffer.get_comm_stream()
    assert created == []


def test_a_buffer_has_deepeps_attributes_and_takes_its_harmless_options(group, created):
    # allow_mnnvl only permits multi-node NVLink (SGLang passes it always); Megatron-Core reads num_rdma_bytes.
    buffer = deep_ep.Buffer(group, 1 << 20, 1 << 22, low_latency_mode=True, allow_mnnvl=True, enable_shrink=True)
    assert (buffer.num_nvl_bytes, buffer.num_rdma_bytes) == (1 << 20, 1 << 22)
    assert (buffer.rank, buffer.group_size, buffer.group, buffer.low_latency_mode) == (0, 1, group, True)
    with pytest.raises(pydeepep.DeepEPNotSupported, match="not exposed as a tensor"):
        buffer.get_local_buffer_tensor(torch.bfloat16)
    assert created == []


def refuse_the_first_low_latency_call_on_rank_0(info, path):
    """Two gloo ranks, no GPU: rank 0's first low-latency dispatch has one token too many. Returns what the call
    raised on this rank and how long it took."""
    import datetime
    import time

    import torch.distributed as dist

    def never(self, ll_sizes):
        raise AssertionError("a communicator was being created")

    deep_ep.Buffer._new_communicator = never
    dist.init_process_group(
        "gloo", init_method=f"file://{path}", rank=info.rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, 0, 1 << 20, low_latency_mode=True)
        start = time.monotonic()
        try:
            buffer.low_latency_dispatch(*ll_inputs(tokens=65 if info.rank == 0 else 4), 64, 16)
            said = "accepted"
        except Exception as exc:
            said = f"{type(exc).__name__}: {exc}"
        return said, time.monotonic() - start
    finally:
        dist.destroy_process_group()


def test_a_first_low_latency_call_refused_on_one_rank_is_refused_on_all(tmp_path):
    """The first low-latency call creates the communicator (collective): a rank refusing it says so to the others,
    which would otherwise wait in the creation until the process group's timeout."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    (said0, seconds0), (said1, seconds1) = pydeepep.spawn(
        refuse_the_first_low_latency_call_on_rank_0, nprocs=2, args=(str(tmp_path / "pg"),), timeout=120
    )
    assert said0.startswith("DeepEPInvalidArgument: x has 65 tokens, more than"), said0
    assert said1.startswith("DeepEPRemoteError: rank 0 refused this Buffer's first low-latency call"), said1
    assert "x has 65 tokens" in said1, said1
    assert max(seconds0, seconds1) < 30, (seconds0, seconds1)


def test_combine_out_must_be_a_contiguous_bfloat16_cuda_tensor():
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out must be"):
        deep_ep._output(torch.zeros(4, 8, dtype=torch.bfloat16), 0, None)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="out must be"):
        deep_ep._output(torch.zeros(4, 8), 0, None)


def test_tensors_travel_detached_and_bfloat16_as_its_bits_without_a_copy():
    x = torch.randn(4, 8).to(torch.bfloat16)
    bits = deep_ep._plain(x)
    assert bits.dtype == torch.uint16 and bits.data_ptr() == x.data_ptr()
    y = torch.zeros(3, dtype=torch.int64)
    assert deep_ep._plain(y).dtype == torch.int64 and deep_ep._plain(y).data_ptr() == y.data_ptr()
    # PyTorch exports no tensor that requires grad (Megatron-Core's router probabilities do, as topk_weights).
    probs = torch.randn(4, 2, requires_grad=True).softmax(-1)
    plain = deep_ep._plain(probs)
    assert not plain.requires_grad and plain.data_ptr() == probs.data_ptr()
    plain.__dlpack__()  # exports
    assert deep_ep._plain(None) is None


class DispatchSeen(Exception):
    """Raised by RecordingCommunicator.dispatch with what the adapter handed pydeepep."""


class RecordingCommunicator(FakeCommunicator):
    nranks, stream = 1, 0

    def dispatch(self, x, **kwargs):
        raise DispatchSeen(kwargs)


def test_a_dispatch_hands_pydeepep_detached_tensors_and_scales_it_can_read(group, monkeypatch):
    import types

    monkeypatch.setattr(deep_ep.Buffer, "_new_communicator", lambda self, ll_sizes: RecordingCommunicator(ll_sizes))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: types.SimpleNamespace(cuda_stream=0))
    buffer = deep_ep.Buffer(group, 1 << 20)
    x = torch.zeros(4, 256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    per_tensor = torch.ones(1, 2).expand(4, 2)  # one scale for every token: strides (0, 1)
    probs = torch.randn(4, 2, requires_grad=True).softmax(-1)
    topk = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(DispatchSeen) as seen:
        buffer.dispatch((x, per_tensor), topk_idx=topk, topk_weights=probs, num_tokens_per_expert=torch.zeros(2))
    handed = seen.value.args[0]
    assert not handed["topk_weights"].requires_grad and handed["topk_weights"].data_ptr() == probs.data_ptr()
    assert handed["x_scales"].stride() == (2, 1) and handed["x_scales"].tolist() == [[1.0, 1.0]] * 4
    # Row-major scales, padded rows included, are read in place.
    padded = torch.ones(4, 3)[:, :2]
    with pytest.raises(DispatchSeen) as seen:
        buffer.dispatch((x, padded), topk_idx=topk, num_tokens_per_expert=torch.zeros(2))
    assert seen.value.args[0]["x_scales"].data_ptr() == padded.data_ptr()
    # Config(0) would reach pydeepep as "its default count": refused, as set_num_sms(0) is.
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="num_sms is 0; it must be positive"):
        buffer.dispatch((x, padded), topk_idx=topk, num_tokens_per_expert=torch.zeros(2), config=deep_ep.Config(0))


def test_a_high_throughput_call_the_adapter_refuses_is_refused_to_the_other_ranks(group, created, monkeypatch):
    # The other ranks are in the call already: this rank's side of it must run (pydeepep's refusal), not only raise.
    refusals = []
    monkeypatch.setattr(deep_ep.Buffer, "_refuse_high_throughput", lambda self, *args: refusals.append(args))
    buffer = deep_ep.Buffer(group, 0, 0)
    x, topk = ll_inputs()
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="allocate_on_comm_stream needs async_finish"):
        buffer.dispatch(x, topk_idx=topk, num_tokens_per_expert=torch.zeros(16), allocate_on_comm_stream=True)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="allocate_on_comm_stream needs async_finish"):
        buffer.dispatch(x, handle="h", num_worst_tokens=64, config=deep_ep.Config(20), allocate_on_comm_stream=True)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="allocate_on_comm_stream needs async_finish"):
        buffer.combine(x, "h", allocate_on_comm_stream=True)
    assert refusals == [("dispatch", None, 0, 24), ("dispatch", "h", 64, 20), ("combine", "h", 0, None)]
