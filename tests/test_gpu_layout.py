"""GPU tier: communicators on RANKS ranks (2 unless DEEPEP_TEST_RANKS says otherwise) and the dispatch layout
against the NumPy oracle.

All scenarios run inside one job (NVSHMEM setup costs seconds); each test asserts on its own scenario.
"""

import numpy as np
import pytest
from conftest import RANKS, SHARE_GPU, all_true, requires_ranks, skip_missing, spawn_ranks

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(max(RANKS, 2))]


def random_topk(rng, num_tokens, num_topk, num_experts, dtype=np.int64, drop=0.2):
    """K distinct experts per token, with a fraction of slots set to -1."""
    topk = (
        np.stack([rng.choice(num_experts, size=num_topk, replace=False) for _ in range(num_tokens)])
        if num_tokens
        else np.zeros((0, num_topk), dtype=np.int64)
    )
    topk = topk.astype(dtype)
    topk[rng.random(topk.shape) < drop] = -1
    return topk


def layout_matches(comm, topk_host, num_experts, device_input=None):
    device_input = pydeepep.to_device(topk_host, device=comm.device) if device_input is None else device_input
    per_rank, per_expert, in_rank = comm.get_dispatch_layout(device_input, num_experts)
    want = reference.dispatch_layout(topk_host, num_experts, comm.nranks)
    got = (per_rank.to_numpy(), per_expert.to_numpy(), in_rank.to_numpy())
    pairs = zip(got, want, strict=True)
    return all(g.dtype == w.dtype and g.shape == w.shape and np.array_equal(g, w) for g, w in pairs)


def layout_scenarios(info):
    """Runs every scenario on one rank; returns {name: result} (results compared by the tests)."""
    out = {}
    rng = np.random.default_rng(1234 + info.rank)
    with pydeepep.Communicator(
        info.unique_id, info.rank, info.nranks, device=info.device, timeout=60, max_tokens_per_rank=1024, hidden=1024
    ) as comm:
        out["topology"] = (comm.rank, comm.nranks, comm.device, comm.ranks_per_nvl_domain, comm.buffer_bytes)
        out["random_int64"] = all(
            layout_matches(comm, random_topk(rng, n, k, e), e)
            for n, k, e in [(4096, 8, 256), (777, 4, 16), (64, 32, 64), (300, 1, RANKS)]
        )
        out["random_int32"] = layout_matches(comm, random_topk(rng, 1000, 8, 64, np.int32), 64)
        # Rank 1 has no tokens at all.
        n = 0 if info.rank == 1 else 128
        out["empty_rank"] = layout_matches(comm, random_topk(rng, n, 8, 32), 32)
        out["one_token"] = layout_matches(comm, random_topk(rng, 1, 8, 32), 32)
        out["all_minus_one"] = layout_matches(comm, np.full((50, 4), -1, np.int64), 8)
        # Many experts per rank: counters no longer fit in shared memory (global-atomic path).
        out["many_experts"] = layout_matches(comm, random_topk(rng, 2000, 8, 2 * 1024), 2 * 1024)
        # Strided rows: the first K columns of a wider array.
        wide = random_topk(rng, 500, 11, 64)
        try:
            import cupy

            with cupy.cuda.Device(comm.device):
                wide_dev = cupy.asarray(wide)
                out["strided_rows"] = layout_matches(comm, np.ascontiguousarray(wide[:, :8]), 64, wide_dev[:, :8])
                # Outputs are taken by CuPy without a copy (same device pointer).
                per_rank, _, in_rank = comm.get_dispatch_layout(wide_dev[:, :8], 64)
                taken = cupy.from_dlpack(in_rank)
                out["dlpack_zero_copy"] = taken.data.ptr == in_rank.ptr and taken.dtype == cupy.bool_
                out["cai_zero_copy"] = cupy.asarray(per_rank).data.ptr == per_rank.ptr
                out["graph_replay"] = graph_replay_matches(comm, rng, cupy)
            # Memory of the other GPU is refused by name (checked by the library from the pointer itself); ranks
            # sharing one GPU (DEEPEP_TEST_SHARE_GPU) have no other GPU.
            other = (comm.device + 1) % comm.nranks
            if other < cupy.cuda.runtime.getDeviceCount() and other != comm.device:
                with cupy.cuda.Device(other):
                    elsewhere = cupy.asarray(random_topk(rng, 8, 2, 8))
                try:
                    comm.get_dispatch_layout(elsewhere, 8)
                    out["other_device"] = "accepted"
                except pydeepep.DeepEPInvalidArgument as exc:
                    out["other_device"] = str(exc)
        except ImportError:
            out["strided_rows"] = out["dlpack_zero_copy"] = out["cai_zero_copy"] = "cupy missing"
            out["graph_replay"] = out["other_device"] = "cupy missing"
        # A CUDA-array-interface-only producer (numba) works too.
        try:
            from numba import cuda as numba_cuda

            routing = random_topk(rng, 300, 6, 32)
            with numba_cuda.gpus[comm.device]:
                out["cai_input"] = layout_matches(comm, routing, 32, numba_cuda.to_device(routing))
        except ImportError:
            out["cai_input"] = "numba missing"
        # E not divisible by R is refused with a message naming it.
        try:
            comm.get_dispatch_layout(pydeepep.to_device(random_topk(rng, 10, 2, 7), device=comm.device), 7)
            out["indivisible"] = "accepted"
        except pydeepep.DeepEPInvalidArgument as exc:
            out["indivisible"] = str(exc)
        # Host memory is refused.
        try:
            comm.get_dispatch_layout(np.zeros((4, 2), np.int64), 8)
            out["host_input"] = "accepted"
        except pydeepep.DeepEPInvalidArgument as exc:
            out["host_input"] = str(exc)
        # An out-of-range expert id is reported through the asynchronous-error flag, not written anywhere.
        bad = random_topk(rng, 64, 4, 16)
        bad[5, 2] = 16
        comm.check_async_error()
        per_rank, _, _ = comm.get_dispatch_layout(pydeepep.to_device(bad, device=comm.device), 16)
        per_rank.to_numpy()
        try:
            comm.check_async_error()
            out["bad_expert"] = "not reported"
        except pydeepep.DeepEPInvalidArgument as exc:
            out["bad_expert"] = str(exc)
        comm.clear_async_error()
        comm.check_async_error()
        # Deterministic: 20 reruns give identical outputs.
        topk = pydeepep.to_device(random_topk(rng, 4096, 8, 256), device=comm.device)
        first = [a.to_numpy() for a in comm.get_dispatch_layout(topk, 256)]
        out["deterministic"] = all(
            all(
                np.array_equal(a.to_numpy(), f) for a, f in zip(comm.get_dispatch_layout(topk, 256), first, strict=True)
            )
            for _ in range(20)
        )
    out["closed_use"] = _closed_use(comm)
    return out


def graph_replay_matches(comm, rng, cupy):
    """Captures the layout (into caller-provided outputs) in a CUDA graph and replays it on new routing."""
    from pydeepep.bench import CapturedGraph

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        topk_buf = cupy.asarray(random_topk(rng, 512, 8, 64))
        outs = comm.get_dispatch_layout(topk_buf, 64, stream=stream.ptr)
        graph = CapturedGraph(lambda: comm.get_dispatch_layout(topk_buf, 64, stream=stream.ptr, out=outs), stream.ptr)
        matches = []
        for _ in range(3):
            routing = random_topk(rng, 512, 8, 64)
            topk_buf.set(routing, stream=stream)
            graph.launch()
            got = [a.to_numpy() for a in outs]
            want = reference.dispatch_layout(routing, 64, comm.nranks)
            matches.append(all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)))
        graph.close()
    return all(matches)


def _closed_use(comm):
    try:
        comm.get_dispatch_layout(None, 8)
        return "accepted"
    except pydeepep.DeepEPInvalidUsage as exc:
        return str(exc)


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(layout_scenarios, nprocs=RANKS, timeout=150 * RANKS)


def test_the_ranks_create_a_communicator_with_nvlink_peers(results):
    assert len(results) == RANKS
    for rank, r in enumerate(results):
        assert r["topology"][:3] == (rank, RANKS, 0 if SHARE_GPU else rank)
        assert r["topology"][3] == RANKS  # every rank reachable over NVLink
        assert r["topology"][4] >= pydeepep.buffer_size_hint(RANKS, max_tokens_per_rank=1024, hidden=1024) - 1


@pytest.mark.parametrize(
    "scenario",
    [
        "random_int64",
        "random_int32",
        "empty_rank",
        "one_token",
        "all_minus_one",
        "many_experts",
        "strided_rows",
        "deterministic",
        "graph_replay",
    ],
)
def test_layout_equals_oracle(results, scenario):
    assert all_true([r[scenario] for r in results]), [r[scenario] for r in results]


def test_layout_takes_cuda_array_interface_inputs(results):
    if results[0]["cai_input"] == "numba missing":
        skip_missing("numba is not installed")
    assert all_true([r["cai_input"] for r in results]), [r["cai_input"] for r in results]


def test_layout_outputs_are_taken_without_copy(results):
    assert [(r["dlpack_zero_copy"], r["cai_zero_copy"]) for r in results] == [(True, True)] * RANKS


def test_experts_not_divisible_by_ranks_is_refused(results):
    for r in results:
        assert "not divisible" in r["indivisible"] or "multiple of the number of ranks" in r["indivisible"]


def test_host_memory_input_is_refused(results):
    for r in results:
        said = r["host_input"]
        assert "expected a CUDA device array" in said and "got host data of type ndarray" in said, said


def test_out_of_range_expert_is_reported_asynchronously(results):
    for r in results:
        assert "dispatch layout" in r["bad_expert"] and "value 16" in r["bad_expert"], r["bad_expert"]


@pytest.mark.skipif(SHARE_GPU, reason="the ranks share one GPU (DEEPEP_TEST_SHARE_GPU): there is no other GPU's memory")
def test_another_gpus_memory_is_refused(results):
    for rank, r in enumerate(results):
        other = (rank + 1) % RANKS
        assert f"lives on device {other} but the communicator uses device {rank}" in r["other_device"], r


def test_calls_after_close_are_refused(results):
    for r in results:
        assert "closed" in r["closed_use"]


def single_rank(info):
    with pydeepep.Communicator(info.unique_id, 0, 1, device=0, timeout=60, max_tokens_per_rank=256) as comm:
        rng = np.random.default_rng(7)
        return comm.ranks_per_nvl_domain, layout_matches(comm, random_topk(rng, 256, 8, 64), 64)


def late_peer(info):
    import time

    if info.rank == 1:
        time.sleep(12)  # never joins in time
        return "slept"
    start = time.monotonic()
    try:
        pydeepep.Communicator(
            info.unique_id, info.rank, info.nranks, device=info.device, timeout=4, max_tokens_per_rank=128
        )
        return "created"
    except pydeepep.DeepEPTimeoutError as exc:
        return ("timeout", time.monotonic() - start, str(exc))


def test_setup_times_out_when_a_peer_never_joins():
    rank0, rank1 = spawn_ranks(late_peer, nprocs=2, timeout=120)
    assert rank1 == "slept"
    assert rank0[0] == "timeout", rank0
    assert 3.5 <= rank0[1] <= 10, rank0
