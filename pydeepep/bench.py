"""`python -m pydeepep.bench`: measures libdeepep on the GPUs of this machine, one rank per local GPU.

This release measures the dispatch layout (N in {512, 4096, 16384}, K = 8, E = 256); the high-throughput and
low-latency sections arrive with those kernels. "device us" is the median time per call replayed from a CUDA
graph (what the GPU spends, no host gaps); "Python call us" is the median per call made from Python one by one
(binding overhead included).
Writes a JSON record (machine, commit, command, results) to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

import pydeepep
from pydeepep.launch import local_device_count

NUM_TOKENS = (512, 4096, 16384)
NUM_TOPK, NUM_EXPERTS = 8, 256


def _check(result):
    from cuda.bindings import driver

    if result[0] != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver call failed: {result[0]!r}")
    return result[1] if len(result) > 1 else None


def time_calls(fn, stream: int, warmup: int, iters: int) -> float:
    """Median microseconds of `fn()` on `stream`, each call bracketed by its own pair of events."""
    from cuda.bindings import driver

    s = driver.CUstream(stream)
    for _ in range(warmup):
        fn()
    _check(driver.cuStreamSynchronize(s))
    pairs = [(_check(driver.cuEventCreate(0)), _check(driver.cuEventCreate(0))) for _ in range(iters)]
    for start, end in pairs:
        _check(driver.cuEventRecord(start, s))
        fn()
        _check(driver.cuEventRecord(end, s))
    _check(driver.cuStreamSynchronize(s))
    times = [_check(driver.cuEventElapsedTime(start, end)) * 1000.0 for start, end in pairs]
    for start, end in pairs:
        driver.cuEventDestroy(start)
        driver.cuEventDestroy(end)
    return float(np.median(times))


class CapturedGraph:
    """`fn()` called `repeat` times, captured from `stream` into an executable CUDA graph."""

    def __init__(self, fn, stream: int, repeat: int = 1):
        from cuda.bindings import driver

        self.stream = driver.CUstream(stream)
        self.repeat = repeat
        _check(driver.cuStreamBeginCapture(self.stream, driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
        try:
            for _ in range(repeat):
                fn()
        finally:
            graph = _check(driver.cuStreamEndCapture(self.stream))
        self.graph = graph
        self.exec = _check(driver.cuGraphInstantiate(graph, 0))

    def launch(self):
        from cuda.bindings import driver

        _check(driver.cuGraphLaunch(self.exec, self.stream))

    def close(self):
        from cuda.bindings import driver

        driver.cuGraphExecDestroy(self.exec)
        driver.cuGraphDestroy(self.graph)


def device_time(fn, stream: int, repeat: int = 20, launches: int = 30) -> float:
    """Median device microseconds per `fn()` call, replayed back to back from a CUDA graph (no host gaps)."""
    graph = CapturedGraph(fn, stream, repeat)
    try:
        return time_calls(graph.launch, stream, warmup=3, iters=launches) / repeat
    finally:
        graph.close()


def bench_rank(info, warmup, iters):
    from cuda.core import Device

    rows = []
    with pydeepep.Communicator(
        info.unique_id, info.rank, info.nranks, device=info.device, buffer_bytes=64 << 20
    ) as comm:
        stream = Device(comm.device).create_stream()
        handle = int(stream.handle)
        rng = np.random.default_rng(info.rank)
        for n in NUM_TOKENS:
            topk = np.argsort(rng.random((n, NUM_EXPERTS)), axis=1)[:, :NUM_TOPK].astype(np.int64)
            topk_dev = pydeepep.to_device(topk, device=comm.device, stream=handle)
            outs = comm.get_dispatch_layout(topk_dev, NUM_EXPERTS, stream=handle)

            def call(topk_dev=topk_dev, outs=outs):
                return comm.get_dispatch_layout(topk_dev, NUM_EXPERTS, stream=handle, out=outs)

            host_us = time_calls(call, handle, warmup, iters)
            us = device_time(call, handle)
            rows.append(
                {
                    "case": "layout",
                    "num_tokens": n,
                    "num_topk": NUM_TOPK,
                    "num_experts": NUM_EXPERTS,
                    "us": us,
                    "python_call_us": host_us,
                }
            )
            if info.rank == 0:
                print(f"  layout N={n:<6} {us:8.1f} us on the device ({host_us:.1f} us per Python call)", flush=True)
        comm.check_async_error()
    return rows


def machine_description() -> str:
    try:
        from cuda.bindings import driver

        _check(driver.cuInit(0))
        name = _check(driver.cuDeviceGetName(128, _check(driver.cuDeviceGet(0))))
        name = name.split(b"\0")[0].decode()
        return f"{local_device_count()} x {name} on {platform.node()}"
    except Exception as exc:  # a description, not a requirement
        return f"unknown ({exc})"


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except Exception:
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pydeepep.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nranks", type=int, default=None, help="ranks (default: one per local GPU)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--output", default="pydeepep_bench.json", help="where to write the JSON record")
    args = parser.parse_args(argv)

    gpus = local_device_count()
    if gpus == 0:
        print(
            "python -m pydeepep.bench: no CUDA GPU is visible on this machine; the benchmark needs at least one "
            "(two or more for communication). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    nranks = args.nranks or gpus
    print(f"pydeepep {pydeepep.__version__} benchmark: {nranks} rank(s) on {machine_description()}", flush=True)
    started = time.time()
    per_rank = pydeepep.spawn(bench_rank, nprocs=nranks, args=(args.warmup, args.iters), timeout=900)
    record = {
        "machine": machine_description(),
        "commit": git_commit(),
        "command": " ".join([sys.executable, "-m", "pydeepep.bench", *(argv if argv is not None else sys.argv[1:])]),
        "nranks": nranks,
        "started": started,
        "results": per_rank,
    }
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{'case':<10}{'N':>8}{'device us (rank 0)':>20}{'slowest rank':>14}{'Python call us':>16}")
    for i, row in enumerate(per_rank[0]):
        slowest = max(rank_rows[i]["us"] for rank_rows in per_rank)
        print(
            f"{row['case']:<10}{row['num_tokens']:>8}{row['us']:>20.1f}{slowest:>14.1f}{row['python_call_us']:>16.1f}"
        )
    print(f"(record written to {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
