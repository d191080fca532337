"""One program, three ways to start it: each rank learns (rank, size, device, unique id) from its launcher, creates
its communicator and computes a dispatch layout.

    export DEEPEP_UNIQUE_ID_FILE=$(mktemp -u /tmp/deepep-job.XXXXXX)  # a fresh path per job: see below
    RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 python launchers.py --via env &
    RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 python launchers.py --via env
    DEEPEP_UNIQUE_ID_FILE=$(mktemp -u /tmp/deepep-job.XXXXXX) torchrun --nproc-per-node 2 launchers.py --via env
    mpirun -np 2 python launchers.py --via mpi
    torchrun --nproc-per-node 2 launchers.py --via torch

(The ranks after rank 0 take an id file at that path that names the same launcher variables, WORLD_SIZE, MASTER_ADDR /
MASTER_PORT and torchrun's or Slurm's job and restart counts; the two shell-started ranks above set none of those but
WORLD_SIZE, so a file left by an earlier such job would give them the wrong id: hence a fresh path per job.) Prints
one line per rank and exits non-zero if the layout disagrees with the reference.
"""

import argparse
import sys

import numpy as np

import pydeepep
from pydeepep import bootstrap, reference


def rank_info(via):
    if via == "env":
        return bootstrap.from_env()
    if via == "mpi":
        return bootstrap.from_mpi()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    info = bootstrap.from_torch_distributed()
    torch.cuda.set_device(info.device)
    return info


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--via", choices=("env", "mpi", "torch"), required=True)
    info = rank_info(parser.parse_args().via)
    num_experts = 8 * info.nranks
    rng = np.random.default_rng(info.rank)
    topk = np.argsort(rng.random((256, num_experts)), axis=1)[:, :4].astype(np.int64)
    with pydeepep.Communicator(
        info.unique_id, info.rank, info.nranks, device=info.device, max_tokens_per_rank=256, hidden=256
    ) as comm:
        per_rank = comm.get_dispatch_layout(pydeepep.to_device(topk, device=comm.device), num_experts)[0].to_numpy()
    ok = np.array_equal(per_rank, reference.dispatch_layout(topk, num_experts, info.nranks)[0])
    print(f"rank {info.rank}/{info.nranks} on device {info.device}: layout {'OK' if ok else 'WRONG'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
