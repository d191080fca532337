"""CPU tier for the PyTorch adapter (skipped where torch is absent): the parts that need no GPU."""

import pytest

torch = pytest.importorskip("torch")

import pydeepep  # noqa: E402
import pydeepep.torch as deep_ep  # noqa: E402


def test_module_surface_matches_deepep():
    assert deep_ep.topk_idx_t is torch.int64
    for name in ("Buffer", "Config", "EventOverlap"):
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
    with pytest.raises(pydeepep.DeepEPNotSupported, match="low-latency"):
        deep_ep.Buffer(None, low_latency_mode=True)
    with pytest.raises(pydeepep.DeepEPNotSupported, match="multi-node"):
        deep_ep.Buffer(None, allow_mnnvl=True)
    with pytest.raises(pydeepep.DeepEPNotSupported, match="low-latency"):
        deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)


def test_bfloat16_tensors_travel_as_their_bits_without_a_copy():
    x = torch.randn(4, 8).to(torch.bfloat16)
    bits = deep_ep._bits(x)
    assert bits.dtype == torch.uint16 and bits.data_ptr() == x.data_ptr()
    y = torch.zeros(3, dtype=torch.int64)
    assert deep_ep._bits(y) is y
