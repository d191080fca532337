"""Shared test helpers: GPU detection (GPU tests skip cleanly where none exists), BF16 / FP8 bit conversions, and
the library loaded through ctypes for the C ABI tests."""

import ctypes
import functools
import importlib
import os
import time
from pathlib import Path

import numpy as np
import pytest


@functools.cache
def gpu_count() -> int:
    from pydeepep.launch import local_device_count

    return local_device_count()


# Ranks of the multi-rank GPU suites: DEEPEP_TEST_RANKS, default 2 (the EP4 and EP8 runs set 4 or 8). Tests of one
# mechanism between two ranks (a peer that skips a call, dies or comes late) keep 2.
RANKS = int(os.environ.get("DEEPEP_TEST_RANKS", "2"))
if RANKS not in (2, 4, 8):
    raise ValueError(f"DEEPEP_TEST_RANKS is {RANKS}; the multi-rank suites run on 2, 4 or 8 ranks")


def all_true(results) -> bool:
    """Whether every rank's result is True (a scenario passed on all RANKS ranks)."""
    return len(results) == RANKS and all(r is True for r in results)


def gpu_tier_cupy():
    """CuPy, which the GPU suites use for their device arrays: the module skips where there is no GPU, and fails to
    collect where there is one but CuPy is missing (a GPU tier that skips its main suites would look like a pass)."""
    if gpu_count() == 0:
        pytest.skip("no CUDA GPU here", allow_module_level=True)
    try:
        import cupy
    except ImportError as error:
        raise ImportError(
            "this machine has a GPU but CuPy is not installed: the GPU tier needs it (pip install cupy-cuda13x)"
        ) from error
    return cupy


# tests/run_gpu_tier.sh sets DEEPEP_TEST_GPU_TIER=1. There a test that would skip for a missing package or tool fails
# instead: a GPU run that lacks part of its environment must not look like a pass. Elsewhere (a CPU machine, a GPU
# machine without the optional array libraries) such tests skip.
GPU_TIER = os.environ.get("DEEPEP_TEST_GPU_TIER") == "1"


def skip_missing(reason: str):
    """Skips the test (or the module) because something it needs is not installed here; fails it in the GPU tier."""
    if GPU_TIER:
        pytest.fail(f"{reason}, and the GPU tier (DEEPEP_TEST_GPU_TIER=1) runs every test", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(module: str):
    """The module, or skip_missing where it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        skip_missing(f"{module} is not installed ({exc})")


def requires_gpus(n: int):
    return pytest.mark.skipif(gpu_count() < n, reason=f"needs {n} CUDA GPU(s); this machine has {gpu_count()}")


# DEEPEP_TEST_SHARE_GPU=1 puts every rank of the high-throughput, low-latency, interop, soak, layout, bad-input and
# torch adapter suites on GPU 0, so that a machine with one GPU runs them (for correctness only: nothing crosses
# NVLink; the two cases that pass another GPU's memory skip). It needs CUDA MPS with each rank's share of the SMs small
# enough that all ranks' grids are resident at once, which tests/run_gpu_tier.sh sets up (docs/reliability.md, "Ranks
# sharing a GPU").
# The other multi-rank suites keep asking for a GPU per rank: the reliability suite starts its ranks itself (and kills
# one), and the examples run on GPU r for rank r. (The torch adapter's tests meet through gloo, not NCCL, which would
# refuse two ranks on one GPU.)
SHARE_GPU = os.environ.get("DEEPEP_TEST_SHARE_GPU") == "1"


def requires_ranks(n: int):
    """Skips unless n ranks of a suite that supports DEEPEP_TEST_SHARE_GPU can run here: n GPUs, or one GPU shared
    under it."""
    runnable = gpu_count() >= n or (SHARE_GPU and gpu_count() >= 1)
    return pytest.mark.skipif(
        not runnable,
        reason=f"needs {n} CUDA GPU(s) (or DEEPEP_TEST_SHARE_GPU=1 and MPS); this machine has {gpu_count()}",
    )


def spawn_ranks(fn, nprocs: int, **kwargs):
    """pydeepep.spawn of nprocs ranks: rank r on GPU r, or all on GPU 0 under DEEPEP_TEST_SHARE_GPU."""
    import pydeepep

    return pydeepep.spawn(fn, nprocs=nprocs, devices=[0] * nprocs if SHARE_GPU else None, **kwargs)


# Every process a test starts inherits these: no NVLink multicast, no IB probing on single-node machines.
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")


def bf16_bits(values):
    """float32 values rounded to bfloat16, as their 16-bit patterns (NumPy has no bfloat16)."""
    from pydeepep import reference

    return (reference.bf16_round(values).view(np.uint32) >> 16).astype(np.uint16)


def bf16_values(bits):
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def e4m3_values(bits):
    """float32 values of float8 e4m3fn bit patterns (0x7F and 0xFF are NaN)."""
    bits = np.asarray(bits).astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    return np.where((bits & 0x7F) == 0x7F, np.nan, sign * value).astype(np.float32)


def exact_equal(got, want) -> bool:
    """Whether `got` holds what `want` holds bit for bit, shapes included, where np.array_equal is not enough:
    integer arrays (raw BF16 / FP8 bits, ids, packed scales) element by element; float arrays (values decoded with
    bf16_values or e4m3_values, the oracle's values, float32 scales and weights) by value AND by sign, so that -0.0
    differs from +0.0 (0x8000 / 0x80 from 0x0000 / 0x00, which np.array_equal takes for equal), and NaN where the
    other has NaN, whatever its sign or payload (e4m3_values gives both NaN patterns one NaN). Bits against values
    raises TypeError: the two are different things, and comparing them would say nothing."""
    got, want = np.asarray(got), np.asarray(want)
    floats = {np.issubdtype(a.dtype, np.floating) for a in (got, want)}
    if len(floats) != 1:
        raise TypeError(f"exact_equal of {got.dtype} and {want.dtype}: compare bits with bits or values with values")
    if got.shape != want.shape:
        return False
    if floats == {False}:
        return bool(np.array_equal(got, want))
    if not np.array_equal(got, want, equal_nan=True):
        return False
    numbers = ~np.isnan(want)
    return bool(np.array_equal(np.signbit(got[numbers]), np.signbit(want[numbers])))


@pytest.fixture(scope="module")
def lib():
    """libdeepep through ctypes alone, as another language's FFI would load it."""
    import pydeepep

    library = ctypes.CDLL(str(Path(pydeepep.get_lib_dir()) / "libdeepep.so"))
    library.deepepGetLastErrorMessage.restype = ctypes.c_char_p
    library.deepepGetErrorString.restype = ctypes.c_char_p
    return library


def last_error(lib) -> str:
    return lib.deepepGetLastErrorMessage().decode()


def bogus_pointer():
    """A host address the library must refuse as device memory."""
    return ctypes.cast(ctypes.create_string_buffer(256), ctypes.c_void_p)


def log_scenario(suite: str, info, name: str, result) -> None:
    """A rank's scenario result as it comes, in $DEEPEP_TEST_LOG_DIR/<suite>_rank<r>.log when that is set (the GPU
    tier script packs these files for debugging runs), after the wall-clock time it came: the ranks' logs of one
    machine then tell, for a call that timed out on one rank, whether its peer finished it long before or only after."""
    directory = os.environ.get("DEEPEP_TEST_LOG_DIR")
    if directory:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        with open(os.path.join(directory, f"{suite}_rank{info.rank}.log"), "a") as f:
            f.write(f"{stamp} {name}: {result}\n")


def one_rank_refusal_failures(comm, calls, refuser, synchronize) -> list:
    """Makes every call of `calls` (what -> (call, the error class rank `refuser` must raise)) on this rank, whatever
    the verdicts, so that the ranks stay in step, each followed by `synchronize()` and the asynchronous error check;
    returns what went wrong: the refusing rank must raise its refusal, every other rank DeepEPRemoteError naming it,
    each within 5 s (well within the test communicators' timeouts, which a rank waiting for the refuser would run
    into)."""

    import pydeepep

    failures = []
    for what, (call, refusal) in calls.items():
        start = time.monotonic()
        said = None
        try:
            call()
            synchronize()
            comm.check_async_error()
        except Exception as exc:
            said = exc
        finally:
            comm.clear_async_error()
        took = time.monotonic() - start
        if comm.rank == refuser and not isinstance(said, refusal):
            failures.append(f"{what}: the refusing rank got {said!r}")
        if comm.rank != refuser and not (
            isinstance(said, pydeepep.DeepEPRemoteError) and f"rank {refuser} refused the call" in str(said)
        ):
            failures.append(f"{what}: got {said!r}")
        if took > 5:
            failures.append(f"{what}: took {took:.1f} s")
    return failures
