"""GPU tier for the PyTorch adapter: DeepEP-style code (`import pydeepep.torch as deep_ep`) on 2 ranks, through
torch tensors, against the NumPy oracle."""

import os
import tempfile
import traceback

import numpy as np
import pytest
from conftest import requires_gpus

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_gpus(2)]
torch = pytest.importorskip("torch")

N, H, K, E = 512, 1024, 4, 16


def inputs(rank):
    rng = np.random.default_rng(rank)
    x = reference.bf16_round(rng.standard_normal((N, H)).astype(np.float32))
    topk = np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < 0.2] = -1
    return x, topk, rng.random((N, K)).astype(np.float32)


def adapter_rank(info, init_file):
    import torch.distributed as dist

    import pydeepep.torch as deep_ep

    out = {}
    torch.cuda.set_device(info.device)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=info.rank, world_size=info.nranks)
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, int(256e6), 0)
        everyone = [inputs(r) for r in range(info.nranks)]
        x_np, topk_np, w_np = everyone[info.rank]
        x = torch.from_numpy(x_np).cuda().to(torch.bfloat16)
        topk, weights = torch.from_numpy(topk_np).cuda(), torch.from_numpy(w_np).cuda()
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, E)
        want_layout = reference.dispatch_layout(topk_np, E, info.nranks)
        out["layout"] = (
            per_rdma is None
            and np.array_equal(per_rank.cpu().numpy(), want_layout[0])
            and np.array_equal(per_expert.cpu().numpy(), want_layout[1])
            and np.array_equal(in_rank.cpu().numpy(), want_layout[2])
        )
        recv_x, recv_idx, recv_w, counts, handle, event = buffer.dispatch(
            x,
            num_tokens_per_rank=per_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=topk,
            topk_weights=weights,
            async_finish=True,
        )
        event.current_stream_wait()
        want = reference.dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone], E)
        mine = want[info.rank]
        out["dispatch"] = (
            recv_x.dtype == torch.bfloat16
            and np.array_equal(recv_x.float().cpu().numpy(), mine[0])
            and np.array_equal(recv_idx.cpu().numpy(), mine[1])
            and np.array_equal(recv_w.cpu().numpy(), mine[2])
            and counts == [int(c) for c in mine[3]]
        )
        combined, combined_w, event = buffer.combine(recv_x, handle, topk_weights=recv_w)
        want_out = reference.combine(
            [w[0] for w in want], [w[4] for w in want], [N] * info.nranks, topk_weights=[w[2] for w in want]
        )
        out["combine"] = np.array_equal(combined.float().cpu().numpy(), want_out[info.rank][0]) and np.array_equal(
            combined_w.cpu().numpy(), want_out[info.rank][1]
        )
        again = buffer.dispatch(x, handle=handle, topk_idx=topk, topk_weights=weights)
        out["cached_zero_copy_outputs"] = torch.equal(again[0], recv_x) and again[0].data_ptr() != recv_x.data_ptr()
        buffer.destroy()
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def results():
    init_file = os.path.join(tempfile.mkdtemp(), "pg")
    return pydeepep.spawn(adapter_rank, nprocs=2, args=(init_file,), timeout=300)


@pytest.mark.parametrize("step", ["layout", "dispatch", "combine", "cached_zero_copy_outputs"])
def test_deepep_style_code_runs_unchanged(results, step):
    assert [r.get(step, r.get("error")) for r in results] == [True, True]
