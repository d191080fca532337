"""Obtain (rank, nranks, device, unique_id) from the launcher a program already uses.

- :func:`from_env`: ``torchrun``-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) plus the unique id in
  ``DEEPEP_UNIQUE_ID`` (hex) or in a file named by ``DEEPEP_UNIQUE_ID_FILE`` that rank 0 writes (mode 0600) and the
  other ranks read;
- :func:`from_mpi`: an ``mpi4py`` communicator (``mpirun -np 2 python prog.py``); rank 0's id is broadcast;
- :func:`from_torch_distributed`: an initialised ``torch.distributed`` group; rank 0's id is broadcast.

Each returns a :class:`pydeepep.launch.RankInfo`, so ``Communicator(info.unique_id, info.rank, info.nranks,
device=info.device)`` follows. None of them is needed by the core; :func:`pydeepep.spawn` covers single-node runs.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
import time

from . import get_unique_id
from .errors import DeepEPInvalidArgument, DeepEPRemoteError, DeepEPTimeoutError
from .launch import RankInfo, _set_job_default

__all__ = ["from_env", "from_mpi", "from_torch_distributed"]


def _listen_on_loopback_if_one_host(one_host: bool) -> None:
    """Where every rank of the job runs on this host, the id's socket need not be reachable from elsewhere: the
    bootstrap listens on the loopback interface, unless the caller named one (NVSHMEM otherwise picks the first
    interface that is neither loopback nor docker, which other machines may reach). As pydeepep.spawn does."""
    if one_host:
        _set_job_default("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")


def _launcher_says_one_host() -> bool:
    """Whether the launcher's variables say all ranks are on this host (torchrun: LOCAL_WORLD_SIZE == WORLD_SIZE)."""
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    return local is not None and world is not None and local.strip() == world.strip()


def _int_env(name: str, default: int | None = None) -> int:
    """A count or index from the environment: ASCII digits only (int() would also take "1_0" as 10 or other scripts'
    digits), never negative."""
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DeepEPInvalidArgument(f"environment variable {name} is not set (a launcher such as torchrun sets it)")
        return default
    if re.fullmatch(r"[0-9]+", value.strip(), flags=re.ASCII) is None:
        raise DeepEPInvalidArgument(f"environment variable {name} is {value!r}, not a non-negative integer")
    return int(value.strip())


# Launcher variables that every rank of a job sees alike and that differ between jobs or between restarts of one
# (torchrun, Slurm). The id file holds them after the id: a file an earlier job or attempt left at the same path names
# other values, so that a rank that starts before rank 0 has written this job's file waits for it instead of joining
# the dead job's bootstrap.
_JOB_VARIABLES = (
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_RESTART_COUNT",
)


def _job_key() -> bytes:
    return "\n".join(f"{name}={os.environ.get(name, '')}" for name in _JOB_VARIABLES).encode()


def _write_id_file(path: str, unique_id: bytes) -> None:
    """Writes the id (and the job's key) so that no reader ever sees a partial file and nobody but this user can read
    it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".deepep-id-")  # created with mode 0600
    except OSError as exc:
        raise DeepEPInvalidArgument(
            f"DEEPEP_UNIQUE_ID_FILE {path}: cannot write in its folder ({exc.strerror})"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(unique_id + _job_key())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _check_id_file(path: str, info: os.stat_result) -> None:
    """Refuses what rank 0 did not write: anything but a regular file, or one another user owns or others may use."""
    if not stat.S_ISREG(info.st_mode):
        raise DeepEPInvalidArgument(
            f"DEEPEP_UNIQUE_ID_FILE {path} is not a regular file; rank 0 writes the id there as one: use a fresh "
            "path in a folder of your own"
        )
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise DeepEPInvalidArgument(
            f"DEEPEP_UNIQUE_ID_FILE {path} is owned by user {info.st_uid} with mode "
            f"{stat.S_IMODE(info.st_mode):o}; rank 0 writes it as this user (uid {os.getuid()}) with mode 600: use "
            "a fresh path in a folder of your own"
        )


def _read_id_file(path: str, timeout: float) -> bytes:
    """Rank 0's id from `path`, once it holds an id of this job (its key, _job_key). A file that another user owns, or
    that others may read or write, is refused: whoever can write it could point this job's ranks at a job of their
    own."""
    deadline = time.monotonic() + timeout
    key = _job_key()
    size = None  # of the file as last seen, for the timeout's message
    other_job = False  # whether it last held the id of another job
    while True:
        try:
            # Not blocking: a FIFO put at the path would hold open() forever (the checks below then refuse it).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                _check_id_file(path, os.fstat(fd))
            except BaseException:
                os.close(fd)
                raise
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            if len(data) == 128 + len(key) and data[128:] == key:
                return data[:128]
            size = len(data)
            other_job = len(data) > 128 and data[128:].startswith(key.partition(b"=")[0])  # a key, not this one
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            if size is None:
                raise DeepEPTimeoutError(f"rank 0 did not write the unique id to {path} within {timeout} s")
            if other_job:
                raise DeepEPTimeoutError(
                    f"{path} still holds the unique id of another job or attempt after {timeout} s (its launcher "
                    f"variables {', '.join(_JOB_VARIABLES)} differ from this rank's): rank 0 did not write this "
                    "job's; give each job a fresh path"
                )
            raise DeepEPTimeoutError(
                f"{path} holds {size} bytes, not a unique id that rank 0 wrote, after {timeout} s: rank 0 writes the "
                "id itself (binary, not hex); give this job a fresh path"
            )
        time.sleep(0.05)


def from_env(timeout: float = 120.0) -> RankInfo:
    """Rank, world size and device from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (device defaults to
    ``LOCAL_RANK``, else 0), and the unique id from ``DEEPEP_UNIQUE_ID`` (256 hex digits) or
    ``DEEPEP_UNIQUE_ID_FILE`` (rank 0 writes it; the others wait up to ``timeout`` seconds for it). Use a fresh
    file path per job: the file names the job by launcher variables (``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``,
    torchrun's run id and restart count, Slurm's job, step and restart count), so that a file an earlier job or
    attempt left is not read as this one's id, but two runs alike in all of these would still mix. A file that
    another user owns or that others may read or write is refused."""
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise DeepEPInvalidArgument(f"timeout is {timeout!r}; it must be a finite number of seconds, at least 0")
    rank, nranks = _int_env("RANK"), _int_env("WORLD_SIZE")
    if not 0 <= rank < nranks:
        raise DeepEPInvalidArgument(f"RANK={rank} is outside [0, WORLD_SIZE={nranks})")
    device = _int_env("LOCAL_RANK", 0)
    text = os.environ.get("DEEPEP_UNIQUE_ID")
    path = os.environ.get("DEEPEP_UNIQUE_ID_FILE")
    if text is not None and path is not None:
        raise DeepEPInvalidArgument("both DEEPEP_UNIQUE_ID and DEEPEP_UNIQUE_ID_FILE are set: set one of them")
    if text is not None:
        try:
            unique_id = bytes.fromhex(text)
        except ValueError:
            raise DeepEPInvalidArgument("DEEPEP_UNIQUE_ID is not hex (use get_unique_id().hex())") from None
        if len(unique_id) != 128:
            raise DeepEPInvalidArgument(f"DEEPEP_UNIQUE_ID holds {len(unique_id)} bytes; 128 are needed")
    elif path is not None:
        if rank == 0:
            _listen_on_loopback_if_one_host(_launcher_says_one_host())
            unique_id = get_unique_id()
            _write_id_file(path, unique_id)
        else:
            unique_id = _read_id_file(path, seconds)
    else:
        raise DeepEPInvalidArgument("set DEEPEP_UNIQUE_ID (hex) or DEEPEP_UNIQUE_ID_FILE (a path all ranks share)")
    return RankInfo(rank, nranks, device, unique_id)


def _broadcast_id(rank: int, broadcast) -> bytes:
    """Rank 0 makes the unique id and ``broadcast`` (payload on rank 0 -> payload on every rank) shares it. A failure
    to make it is shared too, so that the other ranks raise at once instead of waiting for an id that never comes."""
    failure = None
    payload = None
    if rank == 0:
        try:
            payload = (get_unique_id(), None)
        except Exception as exc:
            failure = exc
            payload = (None, f"{type(exc).__name__}: {exc}")
    unique_id, message = broadcast(payload)
    if failure is not None:
        raise failure
    if message is not None:
        raise DeepEPRemoteError(f"rank 0 could not make the unique id: {message}")
    return unique_id


def from_mpi(comm=None, device: int | None = None) -> RankInfo:
    """From an ``mpi4py`` communicator (default ``MPI.COMM_WORLD``): rank 0 makes the id and broadcasts it. The
    device defaults to the rank within the node (``Split_type(COMM_TYPE_SHARED)``)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    on_this_host, rank_here = node.Get_size(), node.Get_rank()
    node.Free()
    _listen_on_loopback_if_one_host(on_this_host == comm.Get_size())
    unique_id = _broadcast_id(comm.Get_rank(), lambda payload: comm.bcast(payload, root=0))
    return RankInfo(comm.Get_rank(), comm.Get_size(), rank_here if device is None else device, unique_id)


def from_torch_distributed(group=None, device: int | None = None) -> RankInfo:
    """From an initialised ``torch.distributed`` process group (default: the world): its rank 0 makes the id and
    broadcasts it. The device defaults to ``LOCAL_RANK``, else torch's current CUDA device."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        raise DeepEPInvalidArgument("torch.distributed is not initialised (call init_process_group first)")
    rank, nranks = dist.get_rank(group), dist.get_world_size(group)

    def broadcast(payload):
        box = [payload]
        # An NCCL group moves the object through a GPU tensor: on this rank's own device, not on torch's current one
        # (device 0 on every rank that has not chosen one, which NCCL refuses for ranks of one node).
        on = torch.device("cuda", device) if dist.get_backend(group) == "nccl" else None
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(box, src=src, group=group, device=on)
        return box[0]

    if device is None:
        if "LOCAL_RANK" in os.environ:
            device = _int_env("LOCAL_RANK")
        else:
            device = torch.cuda.current_device()
    _listen_on_loopback_if_one_host(_launcher_says_one_host())
    unique_id = _broadcast_id(rank, broadcast)
    return RankInfo(rank, nranks, device, unique_id)
