"""GPU tier: array and stream interop on RANKS ranks (conftest), against the NumPy oracle.

Inputs from CuPy, PyTorch, JAX and numba; outputs taken by each library without a copy; every accepted kind of stream;
and stream ordering both ways. The contract under test (pydeepep/_core.pyx, _array.pxi):

- producer -> pydeepep: inputs are viewed with ``StridedMemoryView(obj, stream_ptr=<call stream>)``. For DLPack that
  passes the call's stream to ``obj.__dlpack__(stream=...)``, and the producer (CuPy, PyTorch) makes it wait for its
  *current* stream; for the CUDA array interface cuda.core makes it wait for the interface's ``"stream"`` entry.
- pydeepep -> consumer: ``DeviceArray.__dlpack__(stream=s)`` makes ``s`` wait for ``DeviceArray.stream``, the stream
  of the call that produced the array (``cupy.from_dlpack`` / ``torch.from_dlpack`` pass their current stream).

The ordering scenarios put ~300 ms of spinning in front of the data, so a missing wait reads stale data (zeros, or
a sentinel the outputs were filled with); controls that skip the wait on purpose show that the scenarios would see it.
The dispatches there use a handle (cached mode), which has no host synchronisation.

Everything runs in one job, each library imported inside the ranks when its scenario comes; a library that is
not installed (or has no CUDA) makes its scenarios return "missing: ...", which the tests skip.
"""

import importlib
import os
import traceback

import numpy as np
import pytest
from conftest import (
    RANKS,
    all_true,
    bf16_bits,
    bf16_values,
    log_scenario,
    requires_gpus,
    requires_ranks,
    skip_missing,
    spawn_ranks,
)

import pydeepep
from pydeepep import reference

pytestmark = [pytest.mark.gpu, requires_ranks(RANKS)]

# JAX would otherwise reserve most of each GPU's memory when it starts (the spawned ranks inherit this).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

N, H, K, E = 256, 512, 4, 16
SPIN_MS = 300  # how long the slow producers spin before the data are there
SENTINEL = 0xFFFF  # bfloat16 NaN bits: never a value of the random payloads
MISSING = "missing: "


class LibraryMissing(Exception):
    """The scenario's library is not installed here, or has no CUDA support: its test skips."""


def need(module):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise LibraryMissing(f"{MISSING}{module} ({exc})") from None


# Spins for `ns` nanoseconds of wall time (one thread per block watches the global timer), then the whole grid copies
# n 16-bit words from src to dst.
SPIN_SOURCE = r"""
extern "C" __global__ void spin_then_copy(const unsigned short* src, unsigned short* dst, long long n,
                                          unsigned long long ns) {
  if (threadIdx.x == 0) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
  }
  __syncthreads();
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    dst[i] = src[i];
  }
}
"""


def rank_inputs(seed, rank):
    rng = np.random.default_rng([seed, rank])
    topk = np.argsort(rng.random((N, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < 0.2] = -1
    x_bits = bf16_bits(rng.standard_normal((N, H)).astype(np.float32))
    weights = rng.random((N, K)).astype(np.float32)
    return x_bits, topk, weights


class Case:
    """Every rank's inputs for one seed and what the oracle says each rank gets. The payload goes to the oracle as its
    bfloat16 bit patterns (dispatch copies rows unchanged), so received rows are compared bit for bit."""

    def __init__(self, seed, nranks):
        self.inputs = [rank_inputs(seed, r) for r in range(nranks)]
        self.want = reference.dispatch(
            [i[0] for i in self.inputs], [i[1] for i in self.inputs], [i[2] for i in self.inputs], E
        )
        srcs = [w[4] for w in self.want]
        tokens = [N] * nranks
        # Expert outputs for combine: fresh rows and weights in each rank's receive order.
        self.ys, self.yws = [], []
        for r, w in enumerate(self.want):
            rng = np.random.default_rng([seed, 99, r])
            self.ys.append(bf16_bits(rng.standard_normal((len(w[4]), H)).astype(np.float32)))
            self.yws.append(rng.random((len(w[4]), K)).astype(np.float32))
        self.combined = reference.combine([bf16_values(y) for y in self.ys], srcs, tokens, topk_weights=self.yws)
        # Identity experts: the received rows and weights combined as they came.
        self.identity = reference.combine(
            [bf16_values(w[0]) for w in self.want], srcs, tokens, topk_weights=[w[2] for w in self.want]
        )


class Rank:
    """One rank's communicator, its libraries (imported on first use, made to use this rank's GPU) and helpers."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.rank
        self.device = comm.device
        self.keep = []  # streams handed over as integer handles: alive until the arrays made on them are freed
        self.base = None  # (DispatchResult, oracle) whose outputs the output scenarios take
        self.base_problem = None
        self._cases = {}
        self._libraries = {}
        self._spin_kernel = None
        self._torch_cycles_per_ms = None

    def case(self, seed):
        if seed not in self._cases:
            self._cases[seed] = Case(seed, self.comm.nranks)
        return self._cases[seed]

    def sync(self):
        """Waits for all work on this rank's GPU (every library here uses the device's primary context)."""
        from cuda.core import Device

        device = Device(self.device)
        device.set_current()
        device.sync()

    def finish(self):
        self.sync()
        self.comm.check_async_error()

    def close(self):
        """Drops the arrays and streams kept here, after the work using them (the results are already recorded)."""
        try:
            self.sync()
        except Exception:
            pass
        self.base = None
        self.keep.clear()

    def cupy(self):
        if "cupy" not in self._libraries:
            cupy = need("cupy")
            cupy.cuda.Device(self.device).use()
            self._libraries["cupy"] = cupy
        return self._libraries["cupy"]

    def torch(self):
        if "torch" not in self._libraries:
            torch = need("torch")
            if not torch.cuda.is_available():
                raise LibraryMissing(f"{MISSING}torch with CUDA (torch.cuda.is_available() is False)")
            torch.cuda.set_device(self.device)  # torch exports tensors through DLPack only on the current device
            self._libraries["torch"] = torch
        return self._libraries["torch"]

    def numba_cuda(self):
        if "numba" not in self._libraries:
            cuda = need("numba.cuda")
            if not cuda.is_available():
                raise LibraryMissing(f"{MISSING}numba with CUDA (numba.cuda.is_available() is False)")
            self._libraries["numba"] = cuda
        return self._libraries["numba"]

    def jax(self):
        """(jax, jax.numpy, jax.dlpack, the JAX device of this rank's GPU)."""
        if "jax" not in self._libraries:
            jax = need("jax")
            jnp, dlpack = need("jax.numpy"), need("jax.dlpack")
            try:
                gpus = jax.devices("gpu")
            except RuntimeError as exc:
                raise LibraryMissing(f"{MISSING}jax with a CUDA backend ({exc})") from None
            mine = [d for d in gpus if getattr(d, "local_hardware_id", d.id) == self.device]
            if not mine:
                raise RuntimeError(f"JAX shows no device with CUDA ordinal {self.device}: {gpus}")
            self._libraries["jax"] = (jax, jnp, dlpack, mine[0])
        return self._libraries["jax"]

    def cupy_spin(self, src=None, dst=None):
        """Enqueues SPIN_MS of spinning on CuPy's current stream, then (if given) copies uint16 src into dst."""
        cupy = self.cupy()
        if self._spin_kernel is None:
            self._spin_kernel = cupy.RawKernel(SPIN_SOURCE, "spin_then_copy")
        if src is None:
            src = dst = cupy.zeros(1, cupy.uint16)
            n = 0
        else:
            n = src.size
        self._spin_kernel((16,), (256,), (src, dst, np.int64(n), np.uint64(SPIN_MS * 1_000_000)))

    def torch_spin_cycles(self):
        """Clock cycles of torch.cuda._sleep that last about SPIN_MS (measured once, on the current stream)."""
        torch = self.torch()
        if self._torch_cycles_per_ms is None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            start.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            self._torch_cycles_per_ms = 20_000_000 / max(start.elapsed_time(end), 1e-3)
        return int(self._torch_cycles_per_ms * SPIN_MS)


def torch_array(torch, a, device, bf16=False):
    a = np.ascontiguousarray(a)
    if bf16:  # bit patterns -> a true bfloat16 tensor
        return torch.from_numpy(a.view(np.int16)).to(device).view(torch.bfloat16)
    return torch.from_numpy(a).to(device)


# --- checks --------------------------------------------------------------------------------------------------------


def rows_problem(name, got, want):
    """None if `got` equals `want` exactly, else which rows differ (and whether they look stale)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return f"{name} has shape {got.shape}, the oracle {want.shape}"
    if got.size == 0:
        return None
    bad = np.flatnonzero((got != want).reshape(len(got), -1).any(axis=1))
    if bad.size == 0:
        return None
    what = ""
    if got.dtype == np.uint16:
        rows = got[bad]
        if not rows.any():
            what = " (zeros there: stale input)"
        elif np.all(rows == SENTINEL):
            what = " (the sentinel there: read before it was written)"
    return f"{name} differs from the oracle in {bad.size} of {len(got)} rows{what}"


def dispatch_problem(result, want, weights=True):
    exp_x, exp_idx, exp_w, exp_counts, exp_src = want
    if result.recv_x.dtype_name != "bfloat16":
        return f"recv_x is {result.recv_x.dtype_name}, not bfloat16"
    checks = [
        ("recv_x", result.recv_x, exp_x),
        ("recv_src_idx", result.recv_src_idx, exp_src[:, 1].astype(np.int32)),
        ("recv_topk_idx", result.recv_topk_idx, exp_idx),
    ]
    if weights:
        checks.append(("recv_topk_weights", result.recv_topk_weights, exp_w))
    for name, array, expected in checks:
        problem = rows_problem(name, array.to_numpy(), expected)
        if problem:
            return problem
    if result.num_recv_tokens_per_expert != [int(c) for c in exp_counts]:
        return f"per-expert counts {result.num_recv_tokens_per_expert} != {[int(c) for c in exp_counts]}"
    return None


def combine_problem(combined, want):
    exp_out, exp_w = want
    if combined.out.dtype_name != "bfloat16":
        return f"combine output is {combined.out.dtype_name}, not bfloat16"
    got = bf16_values(combined.out.to_numpy())
    if got.shape != exp_out.shape or not np.array_equal(got, exp_out):
        return "combine output differs from the oracle"
    if combined.topk_weights is None or not np.array_equal(combined.topk_weights.to_numpy(), exp_w):
        return "combined weights differ from the oracle"
    return None


def joined(problems):
    problems = [p for p in problems if p]
    return "; ".join(problems) if problems else True


# --- 1. inputs from each array library -------------------------------------------------------------------------------


def array_maker(ctx, library):
    """A function making `library`'s device array of a NumPy array on this rank's GPU. bfloat16 payloads come as bit
    patterns: CuPy and numba keep them as uint16 (they have no bfloat16), PyTorch and JAX get true bfloat16 arrays."""
    if library == "cupy":
        cupy = ctx.cupy()

        def make(a, bf16=False):
            return cupy.asarray(a)

    elif library == "torch":
        torch = ctx.torch()
        device = torch.device("cuda", ctx.device)

        def make(a, bf16=False):
            return torch_array(torch, a, device, bf16)

    elif library == "jax":
        jax, jnp, _, jax_device = ctx.jax()

        def make(a, bf16=False):
            a = np.ascontiguousarray(a)
            if bf16:
                a = a.view(jnp.bfloat16)
            elif a.dtype == np.int64:
                a = a.astype(np.int32)  # JAX has no 64-bit integers unless x64 is enabled; int32 ids are accepted
            return jax.device_put(a, jax_device)

    elif library == "numba":
        cuda = ctx.numba_cuda()

        def make(a, bf16=False):
            with cuda.gpus[ctx.device]:
                return cuda.to_device(np.ascontiguousarray(a))  # CUDA array interface only

    else:
        raise ValueError(library)
    return make


def inputs_from(ctx, library):
    """Dispatch and combine with every input an array of `library` (default stream), bit-exact against the oracle."""
    make = array_maker(ctx, library)
    case, me = ctx.case(1), ctx.rank
    x_bits, topk, weights = case.inputs[me]
    # Kept referenced until the work that reads them is over (pydeepep does not keep its inputs alive).
    x, t, w = make(x_bits, bf16=True), make(topk), make(weights)
    y, yw = make(case.ys[me], bf16=True), make(case.yws[me])
    result = ctx.comm.dispatch(x, topk_idx=t, topk_weights=w, num_experts=E)
    dispatched = dispatch_problem(result, case.want[me])
    combined = ctx.comm.combine(y, result.handle, topk_weights=yw)  # every rank runs it, even after a mismatch
    problem = dispatched or combine_problem(combined, case.combined[me])
    ctx.sync()
    return f"{library} inputs: {problem}" if problem else True


# --- 2. outputs taken by each array library ---------------------------------------------------------------------------


def outputs_base(ctx):
    """The dispatch whose outputs the output scenarios take (inputs made by pydeepep itself, default stream)."""
    case, me = ctx.case(2), ctx.rank
    x, t, w = (pydeepep.to_device(a, device=ctx.device) for a in case.inputs[me])
    result = ctx.comm.dispatch(x, topk_idx=t, topk_weights=w, num_experts=E)
    ctx.base_problem = dispatch_problem(result, case.want[me])
    ctx.base = (result, case.want[me])
    return f"the dispatch whose outputs are taken: {ctx.base_problem}" if ctx.base_problem else True


# What each library sees for recv_x, recv_topk_weights and recv_src_idx.
TAKEN_DTYPES = {
    "cupy": ("uint16", "float32", "int32"),  # CuPy has no bfloat16: it takes recv_x.bits()
    "torch": ("bfloat16", "float32", "int32"),
    "jax": ("bfloat16", "float32", "int32"),
    "numba": ("uint16", "float32", "int32"),  # the CUDA array interface carries the bits' NumPy dtype
}


def taker(ctx, library):
    """A function taking a DeviceArray into `library` and returning (device pointer, dtype name, host copy), the
    host copy of bfloat16 data as uint16 bits."""
    if library == "cupy":
        cupy = ctx.cupy()

        def take(array):
            taken = cupy.from_dlpack(array.bits() if array.dtype_name == "bfloat16" else array)
            return taken.data.ptr, taken.dtype.name, cupy.asnumpy(taken)

    elif library == "torch":
        torch = ctx.torch()

        def take(array):
            taken = torch.utils.dlpack.from_dlpack(array)
            if taken.dtype == torch.bfloat16:
                host = taken.view(torch.int16).cpu().numpy().view(np.uint16)
            else:
                host = taken.cpu().numpy()
            return taken.data_ptr(), str(taken.dtype).removeprefix("torch."), host

    elif library == "jax":
        _, _, dlpack, _ = ctx.jax()

        def take(array):
            taken = dlpack.from_dlpack(array)
            host = np.asarray(taken)
            if host.dtype.name == "bfloat16":
                host = host.view(np.uint16)
            return taken.unsafe_buffer_pointer(), taken.dtype.name, host

    elif library == "numba":
        cuda = ctx.numba_cuda()

        def take(array):
            with cuda.gpus[ctx.device]:
                taken = cuda.as_cuda_array(array)
                return taken.device_ctypes_pointer.value, taken.dtype.name, taken.copy_to_host()

    else:
        raise ValueError(library)
    return take


def outputs_to(ctx, library):
    """recv_x (bfloat16), recv_topk_weights (float32) and recv_src_idx (int32) taken by `library`: same device
    pointer as the DeviceArray (no copy), the expected dtype and the oracle's values."""
    take = taker(ctx, library)
    if ctx.base is None:
        return "no outputs to take: the dispatch that makes them failed"
    result, (exp_x, _, exp_w, _, exp_src) = ctx.base
    problems = [f"the dispatch whose outputs are taken: {ctx.base_problem}" if ctx.base_problem else None]
    arrays = [
        ("recv_x", result.recv_x, exp_x),
        ("recv_topk_weights", result.recv_topk_weights, exp_w),
        ("recv_src_idx", result.recv_src_idx, exp_src[:, 1].astype(np.int32)),
    ]
    for (name, array, expected), dtype in zip(arrays, TAKEN_DTYPES[library], strict=True):
        ptr, taken_dtype, host = take(array)
        if ptr != array.ptr:
            problems.append(f"{name}: {library} made a copy (pointer {ptr:#x}, the DeviceArray's {array.ptr:#x})")
        if taken_dtype != dtype:
            problems.append(f"{name}: {library} sees dtype {taken_dtype}, expected {dtype}")
        problems.append(rows_problem(f"{name} taken by {library}", host, expected))
    return joined(problems)


# --- 3. every kind of stream ------------------------------------------------------------------------------------------


class StreamProtocol:
    """Any object speaking the CUDA stream protocol, here wrapping a cuda.core stream (kept alive with it)."""

    def __init__(self, stream):
        self._stream = stream

    def __cuda_stream__(self):
        return (0, int(self._stream.handle))


def stream_of_kind(ctx, kind):
    """(the object passed as stream=, its CUstream handle)."""
    if kind in ("cuda_core", "protocol", "int"):
        from cuda.core import Device

        device = Device(ctx.device)
        device.set_current()
        stream = device.create_stream()
        handle = int(stream.handle)
        if kind == "cuda_core":
            return stream, handle
        if kind == "protocol":
            return StreamProtocol(stream), handle
        ctx.keep.append(stream)  # an integer handle keeps nothing alive: the stream must outlive the arrays
        return handle, handle
    if kind == "cupy":
        cupy = ctx.cupy()
        stream = cupy.cuda.Stream(non_blocking=True)
        return stream, stream.ptr
    if kind == "torch":
        torch = ctx.torch()
        stream = torch.cuda.Stream(device=ctx.device)
        return stream, stream.cuda_stream
    raise ValueError(kind)


def calls_on_stream(ctx, kind):
    """Dispatch and combine (identity experts) with stream= of `kind`: right values, outputs produced on it."""
    stream, handle = stream_of_kind(ctx, kind)
    case, me = ctx.case(3), ctx.rank
    x, t, w = (pydeepep.to_device(a, device=ctx.device) for a in case.inputs[me])
    result = ctx.comm.dispatch(x, topk_idx=t, topk_weights=w, num_experts=E, stream=stream)
    combined = ctx.comm.combine(result.recv_x, result.handle, topk_weights=result.recv_topk_weights, stream=stream)
    problems = [dispatch_problem(result, case.want[me]), combine_problem(combined, case.identity[me])]
    for name, array in (("recv_x", result.recv_x), ("the combine output", combined.out)):
        if array.stream != handle:
            problems.append(f"{name} was produced on stream {array.stream:#x}, not on the {kind} stream {handle:#x}")
    ctx.sync()
    return joined(problems)


def calls_from_other_threads(ctx):
    """Dispatch and combine (identity experts) with async_finish on the legacy default stream, each made from a thread
    of its own: first with no CUDA context current in it, then with the next GPU's current. pydeepep makes the
    communicator's device current for its own driver calls (the events, the stream waits, the legacy stream), so
    both match the oracle on this rank's device."""
    from concurrent.futures import ThreadPoolExecutor

    from cuda.bindings import driver
    from cuda.core import Device

    case, me = ctx.case(3), ctx.rank
    x, t, w = (pydeepep.to_device(a, device=ctx.device) for a in case.inputs[me])
    status, count = driver.cuDeviceGetCount()
    assert status == driver.CUresult.CUDA_SUCCESS, status

    def run(current):
        if current is not None:
            Device(current).set_current()
        result = ctx.comm.dispatch(x, topk_idx=t, topk_weights=w, num_experts=E, async_finish=True)
        result.event.synchronize()
        combined = ctx.comm.combine(
            result.recv_x, result.handle, topk_weights=result.recv_topk_weights, async_finish=True
        )
        combined.event.synchronize()
        return [dispatch_problem(result, case.want[me]), combine_problem(combined, case.identity[me])]

    currents = [("no context", None)]
    if count > 1:  # with one GPU there is no other device's context to have current
        currents.append(("another device's context", (ctx.device + 1) % count))
    problems = []
    for what, current in currents:
        with ThreadPoolExecutor(max_workers=1) as thread:
            problems += [f"{what}: {p}" for p in thread.submit(run, current).result() if p]
    ctx.sync()
    return joined(problems)


# --- 4. producer -> pydeepep ------------------------------------------------------------------------------------------


def routing_problem(result, want):
    problem = dispatch_problem(result, want, weights=False)
    return f"the first dispatch (exact size, ready inputs) already differs: {problem}" if problem else None


def written_problem(result, want):
    """Whether the ordered call itself wrote the right rows, once everything is over."""
    problem = rows_problem("recv_x", result.recv_x.to_numpy(), want[0])
    return f"the dispatch wrote wrong rows, ordering aside: {problem}" if problem else None


class CudaArrayInterfaceOnly:
    """A device array seen only through the CUDA array interface v3, its producer named by the "stream" entry."""

    def __init__(self, array, stream):
        self._array = array
        self.__cuda_array_interface__ = {**array.__cuda_array_interface__, "version": 3, "stream": stream}


def ordering_outcome(setup_problem, problem, ordered):
    """The result of an ordering scenario: `problem` is what the ordered read found wrong (None: right data)."""
    if setup_problem:
        return setup_problem
    if ordered:
        return problem or True
    # A control skips the wait on purpose: it must see stale data, or the ordered scenario proves nothing.
    if problem:
        return True
    return (
        f"the control read up-to-date data although nothing ordered it after the {SPIN_MS} ms producer: the ordering "
        "scenarios cannot tell a missing wait"
    )


def producer_cupy(ctx, ordered):
    """x (zeros) is filled on CuPy stream A after SPIN_MS; the dispatch runs on stream B. DLPack makes B wait for
    CuPy's current stream at export: with A current (ordered) the dispatch sees the values; called after leaving A's
    block (control), B waits for the null stream only and the dispatch reads the zeros."""
    cupy = ctx.cupy()
    case, me = ctx.case(4), ctx.rank
    x_bits, topk, _ = case.inputs[me]
    source, t = cupy.asarray(x_bits), cupy.asarray(topk)
    x = cupy.zeros_like(source)
    a, b = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    routing = ctx.comm.dispatch(source, topk_idx=t, num_experts=E)
    setup = routing_problem(routing, case.want[me])
    ctx.sync()
    with a:
        ctx.cupy_spin(source, x)
        if ordered:
            result = ctx.comm.dispatch(x, topk_idx=t, handle=routing.handle, stream=b)
    if not ordered:
        result = ctx.comm.dispatch(x, topk_idx=t, handle=routing.handle, stream=b)
    got = result.recv_x.to_numpy()
    ctx.sync()
    return ordering_outcome(setup, rows_problem("recv_x", got, case.want[me][0]), ordered)


def producer_torch(ctx, ordered):
    """As producer_cupy with PyTorch: x is filled on torch stream A (after torch.cuda._sleep); the dispatch runs on
    torch stream B; PyTorch makes B wait for its current stream at export."""
    torch = ctx.torch()
    device = torch.device("cuda", ctx.device)
    case, me = ctx.case(5), ctx.rank
    x_bits, topk, _ = case.inputs[me]
    source, t = torch_array(torch, x_bits, device, bf16=True), torch_array(torch, topk, device)
    x = torch.zeros_like(source)
    a, b = torch.cuda.Stream(device=device), torch.cuda.Stream(device=device)
    cycles = ctx.torch_spin_cycles()
    routing = ctx.comm.dispatch(source, topk_idx=t, num_experts=E)
    setup = routing_problem(routing, case.want[me])
    ctx.sync()
    with torch.cuda.stream(a):
        torch.cuda._sleep(cycles)
        x.copy_(source)
        if ordered:
            result = ctx.comm.dispatch(x, topk_idx=t, handle=routing.handle, stream=b)
    if not ordered:
        result = ctx.comm.dispatch(x, topk_idx=t, handle=routing.handle, stream=b)
    got = result.recv_x.to_numpy()
    ctx.sync()
    return ordering_outcome(setup, rows_problem("recv_x", got, case.want[me][0]), ordered)


def producer_cai(ctx):
    """x is filled on CuPy stream A after SPIN_MS and handed over through the CUDA array interface alone, its
    "stream" entry naming A; the dispatch on stream B must wait for A."""
    cupy = ctx.cupy()
    case, me = ctx.case(6), ctx.rank
    x_bits, topk, _ = case.inputs[me]
    source, t = cupy.asarray(x_bits), cupy.asarray(topk)
    x = cupy.zeros_like(source)
    a, b = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    routing = ctx.comm.dispatch(source, topk_idx=t, num_experts=E)
    setup = routing_problem(routing, case.want[me])
    ctx.sync()
    with a:
        ctx.cupy_spin(source, x)
    result = ctx.comm.dispatch(CudaArrayInterfaceOnly(x, a.ptr), topk_idx=t, handle=routing.handle, stream=b)
    got = result.recv_x.to_numpy()
    ctx.sync()
    return ordering_outcome(setup, rows_problem("recv_x", got, case.want[me][0]), True)


# --- 5. pydeepep -> consumer ------------------------------------------------------------------------------------------


def consumer_cupy(ctx, mode):
    """A dispatch on stream S writes into out= arrays filled with a sentinel, behind SPIN_MS of spinning on S; a
    consumer on CuPy stream C takes recv_x with cupy.from_dlpack and copies it at once.

    "ordered": the out= arrays come from an earlier call on S; C must wait for S and see the oracle's rows.
    "control": the consumer takes the memory with no stream ordering at all and must see the sentinel.
    "other_stream": the out= arrays come from an earlier call on another stream P; the data are still produced on
    S ("outputs are produced on stream"), so C must wait for S all the same.
    The consumer takes a bits() view made before the dispatch, while recv_x was still P's: the view follows its base
    to S."""
    cupy = ctx.cupy()
    case, me = ctx.case(7), ctx.rank
    x_bits, topk, _ = case.inputs[me]
    x, t = cupy.asarray(x_bits), cupy.asarray(topk)
    s, c = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    p = cupy.cuda.Stream(non_blocking=True) if mode == "other_stream" else s
    ctx.sync()
    base = ctx.comm.dispatch(x, topk_idx=t, num_experts=E, stream=p)
    setup = routing_problem(base, case.want[me])
    early_bits = base.recv_x.bits()
    cupy.from_dlpack(early_bits).fill(SENTINEL)
    ctx.sync()
    with s:
        ctx.cupy_spin()
    result = ctx.comm.dispatch(x, topk_idx=t, handle=base.handle, stream=s, out=base)
    with c:
        if mode == "control":
            memory = cupy.cuda.UnownedMemory(result.recv_x.ptr, result.recv_x.nbytes, result.recv_x)
            taken = cupy.ndarray(result.recv_x.shape, cupy.uint16, cupy.cuda.MemoryPointer(memory, 0))
        else:
            taken = cupy.from_dlpack(early_bits)
        snapshot = taken.copy()
    c.synchronize()
    got = cupy.asnumpy(snapshot)
    ctx.sync()
    setup = setup or written_problem(result, case.want[me])
    problem = rows_problem("recv_x read by the consumer", got, case.want[me][0])
    if result.recv_x.ptr != base.recv_x.ptr:
        problem = "the dispatch did not write into the out= arrays"
    elif problem and mode != "control" and early_bits.stream != s.ptr:
        problem += (
            f"; the call ran on stream {s.ptr:#x} but the bits() view's stream is {early_bits.stream:#x} (recv_x's: "
            f"{result.recv_x.stream:#x}), which is what DLPack consumers wait for"
        )
    return ordering_outcome(setup, problem, mode != "control")


def consumer_torch(ctx, ordered):
    """As consumer_cupy ("ordered" / "control") with PyTorch: the dispatch runs on torch stream S behind
    torch.cuda._sleep; the consumer takes recv_x with torch.from_dlpack on torch stream C (control: a capsule
    exported with stream=-1, no ordering) and clones it at once."""
    torch = ctx.torch()
    device = torch.device("cuda", ctx.device)
    case, me = ctx.case(8), ctx.rank
    x_bits, topk, _ = case.inputs[me]
    x, t = torch_array(torch, x_bits, device, bf16=True), torch_array(torch, topk, device)
    s, c = torch.cuda.Stream(device=device), torch.cuda.Stream(device=device)
    cycles = ctx.torch_spin_cycles()
    ctx.sync()
    base = ctx.comm.dispatch(x, topk_idx=t, num_experts=E, stream=s)
    setup = routing_problem(base, case.want[me])
    torch.from_dlpack(base.recv_x).view(torch.int16).fill_(-1)  # SENTINEL's bits
    ctx.sync()
    with torch.cuda.stream(s):
        torch.cuda._sleep(cycles)
    result = ctx.comm.dispatch(x, topk_idx=t, handle=base.handle, stream=s, out=base)
    with torch.cuda.stream(c):
        if ordered:
            taken = torch.from_dlpack(result.recv_x)
        else:
            taken = torch.utils.dlpack.from_dlpack(result.recv_x.__dlpack__(stream=-1))
        snapshot = taken.view(torch.int16).clone()
    c.synchronize()
    got = snapshot.cpu().numpy().view(np.uint16)
    ctx.sync()
    setup = setup or written_problem(result, case.want[me])
    problem = rows_problem("recv_x read by the consumer", got, case.want[me][0])
    if result.recv_x.ptr != base.recv_x.ptr:
        problem = "the dispatch did not write into the out= arrays"
    return ordering_outcome(setup, problem, ordered)


# --- the job ----------------------------------------------------------------------------------------------------------

SCENARIOS = [
    ("input_cupy", inputs_from, ("cupy",)),
    ("input_torch", inputs_from, ("torch",)),
    ("input_numba", inputs_from, ("numba",)),
    ("outputs_base", outputs_base, ()),
    ("output_cupy", outputs_to, ("cupy",)),
    ("output_torch", outputs_to, ("torch",)),
    ("output_numba", outputs_to, ("numba",)),
    ("stream_cuda_core", calls_on_stream, ("cuda_core",)),
    ("stream_protocol", calls_on_stream, ("protocol",)),
    ("stream_cupy", calls_on_stream, ("cupy",)),
    ("stream_torch", calls_on_stream, ("torch",)),
    ("stream_int", calls_on_stream, ("int",)),
    ("other_threads", calls_from_other_threads, ()),
    ("producer_cupy", producer_cupy, (True,)),
    ("producer_cupy_control", producer_cupy, (False,)),
    ("producer_torch", producer_torch, (True,)),
    ("producer_torch_control", producer_torch, (False,)),
    ("producer_cai", producer_cai, ()),
    ("consumer_cupy", consumer_cupy, ("ordered",)),
    ("consumer_cupy_control", consumer_cupy, ("control",)),
    ("consumer_torch", consumer_torch, (True,)),
    ("consumer_torch_control", consumer_torch, (False,)),
    ("consumer_cupy_out_from_other_stream", consumer_cupy, ("other_stream",)),
    # JAX last: its runtime starts on every GPU of the process.
    ("input_jax", inputs_from, ("jax",)),
    ("output_jax", outputs_to, ("jax",)),
]


def interop_scenarios(info):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    out = {}
    with pydeepep.Communicator(
        info.unique_id,
        info.rank,
        info.nranks,
        device=info.device,
        timeout=30,
        max_tokens_per_rank=N,
        hidden=H,
        num_topk=K,
        num_experts=E,
    ) as comm:
        ctx = Rank(comm)
        stopped = None
        try:
            for name, scenario, args in SCENARIOS:
                if stopped:
                    out[name] = f"not run: the ranks fell out of step in {stopped}"
                    continue
                try:
                    out[name] = scenario(ctx, *args)
                    ctx.finish()
                except LibraryMissing as exc:
                    out[name] = str(exc)
                except Exception:
                    out[name] = traceback.format_exc()
                    try:  # work in flight may still use this scenario's arrays: let it end before they go
                        ctx.sync()
                        comm.clear_async_error()
                    except Exception:
                        pass
                log_scenario("interop", info, name, out[name])
                if isinstance(out[name], str) and "Timeout" in out[name]:
                    stopped = name  # later collective calls would only time out too
        finally:
            ctx.close()
    return out


@pytest.fixture(scope="module")
def results():
    return spawn_ranks(interop_scenarios, nprocs=RANKS, timeout=240 * RANKS)


def outcome(results, name):
    values = [r.get(name, "not run") for r in results]
    for value in values:
        if isinstance(value, str) and value.startswith(MISSING):
            skip_missing(value)
    assert all_true(values), "\n".join(f"rank {r}: {v}" for r, v in enumerate(values))


@pytest.mark.parametrize("library", ["cupy", "torch", "jax", "numba"])
def test_inputs_from_array_libraries_match_the_oracle(results, library):
    outcome(results, f"input_{library}")


@pytest.mark.parametrize("library", ["cupy", "torch", "jax", "numba"])
def test_outputs_are_taken_without_a_copy(results, library):
    outcome(results, f"output_{library}")


@pytest.mark.parametrize("kind", ["cuda_core", "protocol", "cupy", "torch", "int"])
def test_calls_run_on_every_kind_of_stream(results, kind):
    outcome(results, f"stream_{kind}")


def test_calls_from_threads_with_another_or_no_context_current(results):
    outcome(results, "other_threads")


@pytest.mark.parametrize("producer", ["cupy", "torch", "cai"])
def test_calls_wait_for_the_stream_producing_their_inputs(results, producer):
    outcome(results, f"producer_{producer}")


@pytest.mark.parametrize("consumer", ["cupy", "torch"])
def test_dlpack_consumers_wait_for_the_call_stream(results, consumer):
    outcome(results, f"consumer_{consumer}")


def test_dlpack_consumers_wait_for_the_call_stream_when_out_arrays_came_from_another(results):
    outcome(results, "consumer_cupy_out_from_other_stream")


@pytest.mark.parametrize("control", ["producer_cupy", "producer_torch", "consumer_cupy", "consumer_torch"])
def test_ordering_controls_see_stale_data_without_a_wait(results, control):
    outcome(results, f"{control}_control")


def stream_of_another_device_waited_for(info):
    """A stream of GPU 0 made to wait (as a free after DeviceArray.record_stream, or a call after its input's
    producer, is) for a stream of GPU 1 that a kernel holds for half a second, with GPU 0 current: whether it waited,
    and whether it went on once the other stream was done."""
    import cupy
    from test_gpu_bad_input import SPIN_SOURCE

    from pydeepep import _core

    with cupy.cuda.Device(1):
        other = cupy.cuda.Stream(non_blocking=True)
        with other:
            cupy.RawKernel(SPIN_SOURCE, "spin")((1,), (1,), (np.uint64(500_000_000),))
    with cupy.cuda.Device(0):
        waiting = cupy.cuda.Stream(non_blocking=True)
        _core._make_stream_wait(other.ptr, waiting.ptr)
        waited = not waiting.done and not other.done
        other.synchronize()
        waiting.synchronize()
        return waited, waiting.done


@requires_gpus(2)
def test_a_stream_waits_for_a_stream_of_another_device():
    # The event must be recorded in the other stream's context: made in the current one, the record failed, and the
    # free of an array recorded on such a stream was queued without the wait.
    assert pydeepep.spawn(stream_of_another_device_waited_for, nprocs=1, timeout=120) == [(True, True)]
