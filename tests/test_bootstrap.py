"""CPU tier: the launcher helpers derive rank, size, device and one shared unique id (no GPU needed)."""

import os
import stat
import subprocess
import sys
import time

import pytest

import pydeepep
from pydeepep import bootstrap

PROBE = (
    "from pydeepep import bootstrap; i = bootstrap.from_env(timeout=30); "
    "print(i.rank, i.nranks, i.device, i.unique_id.hex())"
)


def run_ranks(nranks, env_extra, tmp_path, code=PROBE):
    """Runs `code` as `nranks` processes with torchrun-style variables; returns each one's printed words."""
    procs = []
    for rank in range(nranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nranks), LOCAL_RANK=str(rank % 2), **env_extra)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    return [o[0].split() for o in outs]


def test_from_env_shares_rank_zeros_id_through_a_file(tmp_path):
    path = tmp_path / "job.id"
    rows = run_ranks(3, {"DEEPEP_UNIQUE_ID_FILE": str(path)}, tmp_path)
    assert [r[:3] for r in rows] == [["0", "3", "0"], ["1", "3", "1"], ["2", "3", "0"]]
    assert len({r[3] for r in rows}) == 1 and len(bytes.fromhex(rows[0][3])) == 128
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # only this user can read the job's secret


def test_from_env_takes_a_hex_id(tmp_path):
    unique_id = pydeepep.get_unique_id()
    rows = run_ranks(2, {"DEEPEP_UNIQUE_ID": unique_id.hex()}, tmp_path)
    assert [r[3] for r in rows] == [unique_id.hex()] * 2


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "outside"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "not a non-negative integer"),
        # int() would read these as 10 and -1
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1_0"}, "LOCAL_RANK is '1_0', not a non-negative integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK is '-1', not a non-negative integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "DEEPEP_UNIQUE_ID": "00" * 128, "DEEPEP_UNIQUE_ID_FILE": "f"}, "both"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "DEEPEP_UNIQUE_ID"),
        ({"RANK": "0", "WORLD_SIZE": "2", "DEEPEP_UNIQUE_ID": "zz"}, "not hex"),
        ({"RANK": "0", "WORLD_SIZE": "2", "DEEPEP_UNIQUE_ID": "00" * 12}, "12 bytes"),
    ],
)
def test_from_env_refuses_incomplete_environments(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DEEPEP_UNIQUE_ID", "DEEPEP_UNIQUE_ID_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match=message):
        bootstrap.from_env()


def test_from_env_times_out_when_rank_zero_never_writes(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("DEEPEP_UNIQUE_ID", raising=False)
    monkeypatch.setenv("DEEPEP_UNIQUE_ID_FILE", str(tmp_path / "never"))
    with pytest.raises(pydeepep.DeepEPTimeoutError, match="did not write"):
        bootstrap.from_env(timeout=0.3)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_from_env_refuses_an_id_path_that_is_no_regular_file(monkeypatch, tmp_path):
    # Another user's FIFO at the path would have held open() forever, whatever the timeout.
    fifo = tmp_path / "id"
    os.mkfifo(fifo, 0o600)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("DEEPEP_UNIQUE_ID", raising=False)
    monkeypatch.setenv("DEEPEP_UNIQUE_ID_FILE", str(fifo))
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="is not a regular file"):
        bootstrap.from_env(timeout=0.3)


def test_from_env_refuses_a_folder_as_the_id_path_and_keeps_no_descriptor(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("DEEPEP_UNIQUE_ID", raising=False)
    monkeypatch.setenv("DEEPEP_UNIQUE_ID_FILE", str(tmp_path))
    open_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="is not a regular file"):
        bootstrap.from_env(timeout=0.3)
    if open_before is not None:
        assert len(os.listdir("/proc/self/fd")) == open_before


def test_from_torch_distributed_broadcasts_rank_zeros_id(tmp_path):
    pytest.importorskip("torch.distributed")
    script = (
        "import os, torch.distributed as dist\n"
        "from pydeepep import bootstrap\n"
        "dist.init_process_group('gloo')\n"
        "i = bootstrap.from_torch_distributed(device=0)\n"
        "print(i.rank, i.nranks, i.unique_id.hex())\n"
        "dist.destroy_process_group()\n"
    )
    rows = run_ranks(2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}, tmp_path, code=script)
    assert [r[:2] for r in rows] == [["0", "2"], ["1", "2"]] and rows[0][2] == rows[1][2]


def fake_broadcast():
    """A broadcast among ranks called one after another, rank 0 first: every rank gets what rank 0 passed."""
    shared = []

    def broadcast(payload):
        if payload is not None:
            shared.append(payload)
        return shared[0]

    return broadcast


def test_a_rank_zero_that_cannot_make_the_id_makes_every_rank_raise(monkeypatch):
    def no_id():
        raise pydeepep.DeepEPNvshmemError("no NVSHMEM here")

    monkeypatch.setattr(bootstrap, "get_unique_id", no_id)
    broadcast = fake_broadcast()
    with pytest.raises(pydeepep.DeepEPNvshmemError, match="no NVSHMEM here"):
        bootstrap._broadcast_id(0, broadcast)
    with pytest.raises(pydeepep.DeepEPRemoteError, match="rank 0 could not make the unique id.*no NVSHMEM here"):
        bootstrap._broadcast_id(1, broadcast)


def test_every_rank_gets_rank_zeros_id(monkeypatch):
    monkeypatch.setattr(bootstrap, "get_unique_id", lambda: b"\x07" * 128)
    broadcast = fake_broadcast()
    assert [bootstrap._broadcast_id(rank, broadcast) for rank in (0, 1, 2)] == [b"\x07" * 128] * 3


def as_rank_one_reading(monkeypatch, path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("DEEPEP_UNIQUE_ID", raising=False)
    monkeypatch.setenv("DEEPEP_UNIQUE_ID_FILE", str(path))


def test_from_env_says_what_a_file_of_the_wrong_size_holds(monkeypatch, tmp_path):
    path = tmp_path / "job.id"
    path.write_text("ab" * 128)  # the hex form, 256 bytes
    path.chmod(0o600)
    as_rank_one_reading(monkeypatch, path)
    with pytest.raises(pydeepep.DeepEPTimeoutError, match="holds 256 bytes, not a unique id that rank 0 wrote"):
        bootstrap.from_env(timeout=0.2)


def test_an_id_file_an_earlier_job_left_is_not_read_as_this_jobs(monkeypatch, tmp_path):
    # A torchrun restart: the same path, another restart count. A rank that starts before rank 0 has written this
    # attempt's file waits for it instead of joining the dead attempt's bootstrap.
    path = tmp_path / "job.id"
    as_rank_one_reading(monkeypatch, path)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    bootstrap._write_id_file(str(path), b"\x01" * 128)  # the first attempt's rank 0
    assert bootstrap.from_env(timeout=5).unique_id == b"\x01" * 128
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(pydeepep.DeepEPTimeoutError, match="still holds the unique id of another job or attempt"):
        bootstrap.from_env(timeout=0.3)
    bootstrap._write_id_file(str(path), b"\x02" * 128)  # the second attempt's rank 0
    assert bootstrap.from_env(timeout=5).unique_id == b"\x02" * 128


def test_from_env_waits_its_timeout_given_as_any_real_number(monkeypatch, tmp_path):
    # A timeout that float() takes (here a string) is the one the wait uses, not passed on as it came.
    import numpy as np

    as_rank_one_reading(monkeypatch, tmp_path / "job.id")
    for timeout in ("0.2", np.float32(0.2)):
        start = time.monotonic()
        with pytest.raises(pydeepep.DeepEPTimeoutError):
            bootstrap.from_env(timeout=timeout)
        assert 0.15 < time.monotonic() - start < 10, f"waited {time.monotonic() - start:.1f} s for a 0.2 s timeout"


def test_from_env_refuses_an_id_file_others_may_write(monkeypatch, tmp_path):
    path = tmp_path / "job.id"
    path.write_bytes(bytes(128))
    path.chmod(0o666)
    as_rank_one_reading(monkeypatch, path)
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="with mode 666"):
        bootstrap.from_env(timeout=5)


def test_from_env_names_an_id_file_it_cannot_write(monkeypatch, tmp_path):
    as_rank_one_reading(monkeypatch, tmp_path / "no" / "such" / "folder" / "job.id")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="job.id: cannot write in its folder"):
        bootstrap.from_env()


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0])
def test_from_env_refuses_a_timeout_that_is_no_number_of_seconds(monkeypatch, tmp_path, timeout):
    as_rank_one_reading(monkeypatch, tmp_path / "never")
    with pytest.raises(pydeepep.DeepEPInvalidArgument, match="timeout is"):
        bootstrap.from_env(timeout=timeout)
