"""Shared test helpers: GPU detection (GPU tests skip cleanly where none exists)."""

import functools
import os

import pytest


@functools.cache
def gpu_count() -> int:
    from pydeepep.launch import local_device_count

    return local_device_count()


def requires_gpus(n: int):
    return pytest.mark.skipif(gpu_count() < n, reason=f"needs {n} CUDA GPU(s); this machine has {gpu_count()}")


# Every process a test starts inherits these: no NVLink multicast, no IB probing on single-node machines.
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
