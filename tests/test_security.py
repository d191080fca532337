"""CPU tier: what the bootstrap exposes. The unique id names a listening socket of the process that made it (the
NVSHMEM bootstrap root); single-node jobs keep it on the loopback interface; nothing outlives the job; the
installed files are not world-writable."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import requires_ranks, spawn_ranks

import pydeepep
from pydeepep.launch import spawn


def tcp_sockets(pid: int) -> list[tuple[str, str]]:
    """(local hex ip:port as /proc shows it, state) of each TCP socket `pid` has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append((fields[1], fields[3]))
    return found


def listening_sockets(pid: int) -> list[str]:
    """Local addresses (hex ip:port as /proc shows them) of the TCP sockets `pid` listens on."""
    return [address for address, state in tcp_sockets(pid) if state == "0A"]  # 0A: LISTEN


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def make_id_and_report(env, make_id="pydeepep.get_unique_id()"):
    """The listening sockets of a new process (environment `env`) once `make_id` made the unique id there."""
    code = (
        "import os, pydeepep, sys\n"
        "from pydeepep import bootstrap\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_security import listening_sockets\n"
        f"{make_id}\n"
        "print(' '.join(listening_sockets(os.getpid())))\n"
    )
    # Run outside the source tree, whose pydeepep/ (without the built extension) would shadow the installed one.
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.split()


def test_unique_id_opens_one_listening_socket_in_its_maker():
    env = {k: v for k, v in os.environ.items() if k != "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"}
    assert len(make_id_and_report(env)) == 1


def test_bootstrap_can_be_kept_on_loopback():
    sockets = make_id_and_report(dict(os.environ, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo"))
    assert len(sockets) == 1 and sockets[0].startswith(LOOPBACK + ":")


def rank_zero_listeners(info):
    return listening_sockets(os.getpid()) if info.rank == 0 else None


def test_single_node_jobs_listen_on_loopback_only():
    sockets = spawn(rank_zero_listeners, nprocs=2, timeout=120)[0]
    assert sockets and all(s.startswith(LOOPBACK + ":") for s in sockets), sockets


def test_a_torchrun_job_on_one_host_listens_on_loopback_only(tmp_path):
    # torchrun's variables say every rank is here (LOCAL_WORLD_SIZE == WORLD_SIZE): nothing outside need reach the id.
    env = {k: v for k, v in os.environ.items() if k != "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", DEEPEP_UNIQUE_ID_FILE=str(tmp_path / "id"))
    sockets = make_id_and_report(env, make_id="bootstrap.from_env()")  # rank 0 of an id file makes the id
    assert len(sockets) == 1 and sockets[0].startswith(LOOPBACK + ":"), sockets


def test_nothing_listens_after_the_process_that_made_the_id_exits():
    sockets = make_id_and_report(dict(os.environ, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo"))
    port = sockets[0].split(":")[1]
    still = [
        line
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[1].endswith(":" + port) and line.split()[3] == "0A"
    ]
    assert still == []


def test_a_program_the_id_maker_starts_does_not_inherit_its_listening_socket(tmp_path):
    """The bootstrap root's socket is close-on-exec: a shell command started after get_unique_id (even with
    close_fds=False) holds no listener, so nothing keeps the port open once the id's maker exits."""
    code = (
        "import os, pydeepep, subprocess, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_security import listening_sockets\n"
        "pydeepep.get_unique_id()\n"
        "assert listening_sockets(os.getpid()), 'no listener to check'\n"
        "child = subprocess.Popen(['sleep', '30'], close_fds=False)\n"
        "try:\n"
        "    print(' '.join(listening_sockets(child.pid)) or 'none')\n"
        "finally:\n"
        "    child.kill()\n"
    )
    env = dict(os.environ, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["none"], out.stdout


def sockets_a_started_program_inherits(info):
    """This rank's TCP sockets once its communicator is set up, and those a program it starts then (close_fds=False)
    holds."""
    with pydeepep.Communicator(info.unique_id, info.rank, info.nranks, device=info.device, timeout=30):
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
        try:
            return tcp_sockets(os.getpid()), tcp_sockets(child.pid)
        finally:
            child.kill()
            child.wait()


@requires_ranks(2)
def test_a_program_a_rank_starts_inherits_none_of_the_bootstrap_connections():
    # NVSHMEM's bootstrap connects the ranks over TCP without close-on-exec: a program a rank started (a compiler, a
    # shell command) kept those connections open after the rank ended, so its peers did not see them close.
    # A descriptor number the bootstrap root's thread freed and NVSHMEM took over in the same setup counted as old.
    for rank, (own, inherited) in enumerate(spawn_ranks(sockets_a_started_program_inherits, nprocs=2, timeout=180)):
        assert own, f"rank {rank}: no bootstrap socket to check"
        assert inherited == [], f"rank {rank}'s program inherited {inherited} of its {own}"


def test_installed_files_are_not_world_writable():
    root = Path(pydeepep.__file__).parent
    writable = [p for p in root.rglob("*") if not p.is_symlink() and p.stat().st_mode & stat.S_IWOTH]
    assert writable == []
