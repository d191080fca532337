"""GPU tier: a peer that dies mid-stream (SIGKILL, no teardown at all).

Two ranks run a few dispatch + combine steps (HT in one job, LL in another); then rank 1 kills itself. Rank 0's next
call must raise DeepEPTimeoutError naming rank 1 within the communicator's timeout plus a few seconds, close the
communicator (its collective teardown may itself time out, never hang) and exit with status 0.

pydeepep.spawn treats a rank that dies without reporting as a failed job and kills the others, so this test starts
its ranks itself: spawned processes, one report queue per rank (a rank killed while writing to a shared queue could
leave its lock held), and the parent tells rank 0 when rank 1 is gone.
"""

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import numpy as np
import pytest
from conftest import bf16_bits, bf16_values, requires_gpus

import pydeepep
from pydeepep import reference
from pydeepep.launch import RankInfo

pytestmark = [pytest.mark.gpu, requires_gpus(2)]

TIMEOUT = 5.0  # the communicators' timeout
GRACE = 5.0  # how much longer than TIMEOUT a timed-out call may take to report
WARMUP_STEPS = 3
N, H, K, E, T = 64, 256, 4, 16, 64


def inputs(rank):
    rng = np.random.default_rng([70, rank])
    topk = np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < 0.1] = -1
    x = bf16_bits(rng.standard_normal((N, H)).astype(np.float32))
    return x, topk, rng.random((N, K)).astype(np.float32)


def synchronize():
    from cuda.bindings import runtime

    (status,) = runtime.cudaDeviceSynchronize()
    if status != runtime.cudaError_t.cudaSuccess:
        raise RuntimeError(f"cudaDeviceSynchronize failed: {status!r}")


def step(comm, call, x, topk, weights):
    """One step both ranks take while both are alive: dispatch and combine (HT or LL), checked for faults."""
    if call == "dispatch":
        result = comm.dispatch(x, topk_idx=topk, topk_weights=weights, num_experts=E)
        comm.combine(result.recv_x, result.handle, topk_weights=result.recv_topk_weights)
    else:
        result = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
        comm.low_latency_combine(result.recv_x, topk, weights, result)
    synchronize()
    comm.check_async_error()


def survive_alone(comm, host_inputs, inputs_dev):
    """After a low-latency call timed out waiting for the dead rank 1, rank 0 has masked it: it clears the error and
    goes on alone; its dispatch and combine match the oracle without rank 1 (no tokens from it, and the slots naming
    its experts skipped). True or what differs."""
    masked = comm.low_latency_masked_ranks()
    if masked != [False, True]:
        return f"masked ranks after the timeout: {masked}"
    comm.clear_async_error()
    x, topk, weights = inputs_dev
    result = comm.low_latency_dispatch(x, topk, E, use_fp8=False)
    out = comm.low_latency_combine(result.recv_x, topk, weights, result).out
    synchronize()
    comm.check_async_error()
    x_np, topk_np, w_np = host_inputs
    local = E // 2
    seen = [np.where(topk_np // local == 1, -1, topk_np), np.zeros((0, K), np.int64)]
    want = reference.low_latency_dispatch([bf16_values(x_np), np.zeros((0, H), np.float32)], seen, E, T, use_fp8=False)
    if not np.array_equal(result.recv_count.to_numpy(), want[0][2]):
        return f"recv_count {result.recv_count.to_numpy().tolist()} != {want[0][2].tolist()}"
    got_x = bf16_values(result.recv_x.to_numpy())
    for le, m in enumerate(want[0][2]):
        if not np.array_equal(got_x[le, :m], want[0][0][le, :m]):
            return f"rows of local expert {le} differ"
    ys = [got_x, np.zeros_like(got_x)]
    want_out = reference.low_latency_combine(ys, seen, [w_np, np.zeros((0, K), np.float32)], [w[3] for w in want])[0]
    if not np.array_equal(bf16_values(out.to_numpy()), want_out):
        return "combine output differs"
    return True


def killed_peer(info, post, may_die, peer_dead, call):
    """Rank 1 dies after WARMUP_STEPS steps; rank 0 then makes `call` and closes. Reports go through `post`."""
    comm = pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=TIMEOUT,
        max_tokens_per_rank=N,
        hidden=H,
        num_topk=K,
        num_experts=E,
        low_latency_max_tokens=T if call.startswith("ll_") else 0,
    )
    try:
        host_inputs = inputs(info.rank)
        x, topk, weights = (pydeepep.to_device(a, device=comm.device) for a in host_inputs)
        for _ in range(WARMUP_STEPS):
            step(comm, call, x, topk, weights)
        post("warmup", WARMUP_STEPS)
        if info.rank == 1:
            may_die.wait(60)  # until rank 0's steps are all complete too
            os.kill(os.getpid(), signal.SIGKILL)
        may_die.set()
        if not peer_dead.wait(60):
            post("call", "rank 1 was still alive after 60 s")
            return
        start = time.monotonic()
        try:
            if call == "dispatch":
                comm.dispatch(x, topk_idx=topk, topk_weights=weights, num_experts=E)
            else:
                comm.low_latency_dispatch(x, topk, E, use_fp8=False)
            synchronize()  # stream-ordered calls report through the asynchronous error
            comm.check_async_error()
            post("call", ("no error", time.monotonic() - start, ""))
        except pydeepep.DeepEPError as exc:
            post("call", (type(exc).__name__, time.monotonic() - start, str(exc)))
        if call == "ll_dispatch":
            try:
                post("survivor", survive_alone(comm, host_inputs, (x, topk, weights)))
            except Exception:
                post("survivor", traceback.format_exc())
    finally:
        start = time.monotonic()
        try:
            comm.close()
            post("close", ("closed", time.monotonic() - start, ""))
        except pydeepep.DeepEPError as exc:
            post("close", (type(exc).__name__, time.monotonic() - start, str(exc)))
        # NVSHMEM's teardown was skipped: a new communicator in this process is refused at once, saying why.
        try:
            pydeepep.Communicator(pydeepep.get_unique_id(), 0, 1, device=info.device, timeout=TIMEOUT)
            post("again", ("made", ""))
        except pydeepep.DeepEPError as exc:
            post("again", (type(exc).__name__, str(exc)))


def _rank_process(target, rank, nranks, id_queue, reports, args):
    def post(key, value):
        reports.put((key, value))

    try:
        if rank == 0:
            unique_id = pydeepep.get_unique_id()
            for _ in range(nranks - 1):
                id_queue.put(unique_id)
        else:
            unique_id = id_queue.get(timeout=120)
        target(RankInfo(rank, nranks, rank, unique_id), post, *args)
        post("returned", True)
    except BaseException:
        post("error", traceback.format_exc())
        raise SystemExit(1) from None


def _drain(reports, got, wait=0.0):
    for rank, q in enumerate(reports):
        while True:
            try:
                key, value = q.get(timeout=wait) if wait else q.get_nowait()
            except queue.Empty:
                break
            got[rank][key] = value
            got[rank][f"{key}@"] = time.monotonic()


def run_job(target, args, nranks=2, limit=180.0):
    """Runs `target(info, post, may_die, peer_dead, *args)` on `nranks` spawned ranks; returns each rank's reports
    (key -> value, and key@ -> when the parent read it), exit codes, and when each rank's exit was seen."""
    ctx = mp.get_context("spawn")
    id_queue = ctx.Queue()
    reports = [ctx.Queue() for _ in range(nranks)]
    may_die, peer_dead = ctx.Event(), ctx.Event()
    saved = os.environ.get("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
    os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")  # every rank is on this host
    try:
        procs = [
            ctx.Process(
                target=_rank_process,
                args=(target, rank, nranks, id_queue, reports[rank], (may_die, peer_dead, *args)),
                name=f"reliability-rank{rank}",
            )
            for rank in range(nranks)
        ]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", None)
    got = [{} for _ in range(nranks)]
    exited_at = [None] * nranks
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline and any(at is None for at in exited_at):
            _drain(reports, got)
            for rank, p in enumerate(procs):
                if exited_at[rank] is None and p.exitcode is not None:
                    exited_at[rank] = time.monotonic()
                    if rank != 0:
                        peer_dead.set()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(30)
        _drain(reports, got, wait=1.0)
    return got, [p.exitcode for p in procs], exited_at


@pytest.mark.parametrize("call", ["dispatch", "ll_dispatch"])
def test_a_killed_peer_gives_a_timeout_naming_it_and_the_survivor_exits_cleanly(call):
    reports, exitcodes, exited_at = run_job(killed_peer, (call,))
    rank0 = {k: v for k, v in reports[0].items() if not k.endswith("@")}
    print(f"rank 0 reported {rank0}; exit codes {exitcodes}")
    assert "error" not in rank0, rank0["error"]
    assert rank0.get("warmup") == WARMUP_STEPS, rank0
    assert exitcodes[1] == -signal.SIGKILL, f"rank 1 exit code {exitcodes[1]}: {reports[1]}"

    outcome = rank0.get("call")
    assert isinstance(outcome, tuple), f"rank 0's {call} after the peer died did not report: {rank0}"
    kind, seconds, message = outcome
    assert kind == "DeepEPTimeoutError", outcome
    assert seconds < TIMEOUT + GRACE, outcome
    assert "waiting for rank 1" in message, outcome
    if call == "ll_dispatch":
        assert rank0.get("survivor") is True, rank0.get("survivor")

    closed = rank0.get("close")
    assert isinstance(closed, tuple), f"rank 0 never finished close(): {rank0}"
    # The teardown is collective: with the peer gone it gives up waiting for it, in bounded time, and does not raise,
    # since the call above already reported the timeout (docs/reliability.md).
    assert closed[0] == "closed", closed
    assert closed[1] < TIMEOUT + GRACE, closed
    again = rank0.get("again")
    assert again is not None and again[0] == "DeepEPInvalidUsage", again
    assert "cannot set up NVSHMEM again" in again[1], again
    assert rank0.get("returned") is True, rank0
    assert exitcodes[0] == 0, f"rank 0 exit code {exitcodes[0]} (None or -9: it hung at exit and was killed)"
    assert exited_at[0] - reports[0]["close@"] < 30, "rank 0 took more than 30 s to exit after close()"
