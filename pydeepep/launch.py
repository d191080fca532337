"""Single-node launcher: one spawned process per local GPU, each handed its rank, the world size and the bootstrap id.

Processes are started with the "spawn" method (never fork after CUDA use). Rank 0 makes the unique id and passes it
to the others through a queue (never the network); NVSHMEM's bootstrap listens on the loopback interface, and
nothing listens once the job is over.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import operator
import os
import pickle
import queue
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

# Defaults for the processes a single-node job starts (a caller's own setting wins): never NVLink multicast (it can
# take shared GPUs down), and the NVSHMEM bootstrap listens on the loopback interface only, since every rank is on
# this host (nothing outside the machine can reach it).
_JOB_ENV = {
    "NVSHMEM_DISABLE_NVLS": "1",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
}


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """What a spawned rank needs to create its Communicator: ``Communicator(info.unique_id, info.rank,
    info.nranks, device=info.device)``."""

    rank: int
    nranks: int
    device: int
    unique_id: bytes


class LaunchError(RuntimeError):
    """A spawned rank failed or did not finish in time; the message holds that rank's traceback."""


def local_device_count() -> int:
    """CUDA devices visible to this process (0 where there is no driver)."""
    try:
        from cuda.bindings import driver

        (status,) = driver.cuInit(0)
        if status != driver.CUresult.CUDA_SUCCESS:
            return 0
        status, count = driver.cuDeviceGetCount()
        return count if status == driver.CUresult.CUDA_SUCCESS else 0
    except Exception:
        return 0


def _exit_with_parent() -> None:
    """Ends this rank at once if the process that spawned it ends first: killed (SIGTERM from a scheduler, say), it
    runs no cleanup, and its ranks would otherwise go on holding their GPUs, waiting for peers."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()  # returns once the parent's end of its sentinel pipe is closed: the parent is gone
        os._exit(1)

    threading.Thread(target=watch, name="pydeepep-parent-watch", daemon=True).start()


def _set_job_default(key: str) -> None:
    """_JOB_ENV's value of `key` where the variable is unset or empty (an empty interface name, from an unset shell
    variable, would let NVSHMEM's bootstrap listen on every interface's first address)."""
    if not os.environ.get(key):
        os.environ[key] = _JOB_ENV[key]


def _set_job_env() -> None:
    for key in _JOB_ENV:
        _set_job_default(key)


def _rank_main(pickled_fn, rank, nranks, device, id_queue, report, args, kwargs, id_timeout):
    """A rank: its result, or its traceback, goes to the parent through `report` (this rank's own pipe), pickled
    here, so that a result that cannot be pickled is reported as this rank's failure. The function is unpickled here
    too, so that one this process cannot import is reported with its traceback (multiprocessing would print it and
    exit before any report)."""
    # Only this process may hold the pipe's writing end: a program it starts (os.system, a library's fork) would keep
    # the pipe open after this rank died, and the parent would not see the end.
    os.set_inheritable(report.fileno(), False)
    _exit_with_parent()
    _set_job_env()
    try:
        fn = pickle.loads(pickled_fn)
        from . import get_unique_id

        if rank == 0:
            unique_id = get_unique_id()
            for _ in range(nranks - 1):
                id_queue.put(unique_id)
        else:
            unique_id = id_queue.get(timeout=id_timeout)  # the parent also ends this rank if rank 0 fails
        value = fn(RankInfo(rank, nranks, device, unique_id), *args, **kwargs)
        message = pickle.dumps((True, pickle.dumps(value)))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit non-zero
        report.send_bytes(pickle.dumps((False, traceback.format_exc())))
        raise SystemExit(1) from None
    report.send_bytes(message)


def spawn(
    fn: Callable[..., Any],
    nprocs: int | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float | None = 600.0,
    devices: Sequence[int] | None = None,
) -> list:
    """Runs ``fn(RankInfo, *args, **kwargs)`` in ``nprocs`` spawned processes (default: one per local GPU) and
    returns their return values ordered by rank. ``fn`` must be importable (defined at module level).

    Rank r runs on GPU ``devices[r]`` (default: GPU r); ``devices`` without ``nprocs`` runs one rank per entry. Ranks
    may share a GPU only under CUDA MPS (the Multi-Process Service), with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` giving
    each a share of the SMs: without MPS their kernels, which wait for each other, take turns on the GPU and time
    out, and so did low-latency ones at 100 / nprocs percent, and for four ranks at 80 / nprocs; 40 % for two ranks
    and 12 % for four ran together (docs/reliability.md).

    Raises :class:`LaunchError` with the failing rank's traceback if any rank raises, exits before reporting or
    returns a result that cannot be pickled, and after ``timeout`` seconds kills every rank and raises, so a hung job
    never outlives the call; a rank also ends at once if this process ends without that cleanup (killed). A rank that
    exits abnormally after reporting its result gives a ``RuntimeWarning``. ``fn`` reports by returning: a
    ``SystemExit`` in it, ``sys.exit(0)`` included, is that rank's failure.
    """
    if nprocs is None and devices is not None:
        nprocs = len(devices)
    if nprocs is None:
        nprocs = local_device_count()
        if nprocs == 0:
            raise LaunchError("no CUDA device is visible: nothing to launch")
    if nprocs < 1:
        raise ValueError(f"nprocs is {nprocs}; it must be at least 1")
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout is {timeout!r}; it must be None or a finite number of seconds, at least 0")
    devices = list(range(nprocs)) if devices is None else [operator.index(d) for d in devices]
    if len(devices) != nprocs or min(devices) < 0:
        raise ValueError(f"devices is {devices}; it must give a GPU index (>= 0) to each of the {nprocs} ranks")
    # The function by reference, with plain pickle (multiprocessing's own pickler takes the arguments, which may hold
    # multiprocessing objects): a function the ranks cannot import fails inside a rank, with its traceback reported.
    pickled_fn = pickle.dumps(fn)
    ctx = mp.get_context("spawn")
    id_queue = ctx.Queue()
    # One pipe per rank, whose writing end only that rank holds: a rank that ends, even in the middle of sending its
    # result, closes it, and its reader sees the end (a queue shared with this process would wait for the rest).
    pipes = [ctx.Pipe(duplex=False) for _ in range(nprocs)]
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(pickled_fn, rank, nprocs, devices[rank], id_queue, pipes[rank][1], args, kwargs or {}, timeout),
            name=f"pydeepep-rank{rank}",
        )
        for rank in range(nprocs)
    ]
    reports: queue.Queue = queue.Queue()  # (rank, the pickled report or None where the rank sent none)
    results: dict[int, Any] = {}
    failure = None
    interrupted = True  # until the wait ends by itself: an exception (Ctrl-C, say), while starting too, kills the ranks
    saved = {key: os.environ.get(key) for key in _JOB_ENV}
    try:
        try:
            _set_job_env()
            for p in procs:
                p.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        for rank, (reader, writer) in enumerate(pipes):
            writer.close()  # the rank's copy is the only one left
            # A thread per rank reads, so that a report cut short blocks no wait below: the deadline still holds.
            threading.Thread(target=_read_report, args=(rank, reader, reports), daemon=True).start()
        deadline = None if timeout is None else time.monotonic() + timeout
        ended_at: dict[int, float] = {}  # when a rank not yet reported was first seen ended
        while len(results) < nprocs and failure is None:
            try:
                rank, report = reports.get(timeout=0.2)
                failure = _take_report(rank, report, procs[rank], results)
            except queue.Empty:
                pass
            # A rank that ended has at most a pipe buffer's worth of its report left to read, which its reader takes
            # at once: after 5 s (room for this thread unpickling a large result meanwhile), the rank sent none, and
            # something else holds its pipe open (a process it forked), so that no end comes.
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if failure is None and rank not in results and p.exitcode is not None:
                    if now - ended_at.setdefault(rank, now) > 5.0 and reports.empty():
                        failure = f"rank {rank} exited with code {p.exitcode} without reporting"
            if deadline is not None and time.monotonic() > deadline and failure is None:
                missing = sorted(set(range(nprocs)) - set(results))
                failure = f"ranks {missing} did not finish within {timeout} s"
        interrupted = False
    finally:
        started = [(rank, p) for rank, p in enumerate(procs) if p.pid is not None]
        if failure is not None or interrupted:
            for _, p in started:
                if p.is_alive():
                    p.kill()
        killed = set()
        join_deadline = time.monotonic() + 30  # for all ranks together: their exits overlap
        for rank, p in started:
            p.join(timeout=max(0.0, join_deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=10)  # a process in an uninterruptible wait (in a driver) may outlast even a kill
                killed.add(rank)
    if failure is not None:
        raise LaunchError(failure)
    # A rank that reported and then died on its way out (a crash in teardown, os._exit in an exit handler), or did not
    # exit within 30 s and was killed: its results stand, but say so. (A rank whose communicator timed out leaves
    # NVSHMEM's setup thread behind, which may take the process down at exit.)
    unclean = [
        f"rank {rank} did not exit within 30 s after reporting and was killed"
        if rank in killed
        else f"rank {rank} exited with code {p.exitcode} after reporting"
        for rank, p in enumerate(procs)
        if rank in killed or p.exitcode != 0
    ]
    if unclean:
        warnings.warn("; ".join(unclean), RuntimeWarning, stacklevel=2)
    return [results[r] for r in range(nprocs)]


def _read_report(rank: int, reader, reports: queue.Queue) -> None:
    """Hands `rank`'s report to `reports`: its bytes, None where the rank ended without sending all of it, or the
    exception that receiving it raised (a MemoryError, say), so that the wait never misses a rank."""
    try:
        report = reader.recv_bytes()
    except (EOFError, OSError):
        report = None
    except BaseException as exc:
        report = exc
    finally:
        reader.close()
    reports.put((rank, report))


def _take_report(rank: int, report, process, results: dict) -> str | None:
    """Files a rank's report into `results`; what went wrong, where something did."""
    if report is None:
        process.join(timeout=5)  # for its exit code: its pipe closed as it ended
        return f"rank {rank} exited with code {process.exitcode} without reporting"
    if isinstance(report, BaseException):
        return f"rank {rank}'s report could not be received here: {report!r}"
    ok, value = pickle.loads(report)
    if not ok:
        return f"rank {rank} failed:\n{value}"
    try:
        results[rank] = pickle.loads(value)
    except Exception as error:  # a class the parent cannot import, say
        return f"rank {rank}'s result could not be unpickled here: {error!r}"
    return None
