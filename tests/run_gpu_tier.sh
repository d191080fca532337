#!/usr/bin/env bash
# Builds pydeepep from source on a GPU machine and runs the GPU tier and the examples; logs go to $OUT if set.
# Usage (repo root): bash tests/run_gpu_tier.sh [pytest args, default: tests]
# DEEPEP_TEST_RANKS=4 (or 8) runs the multi-rank suites on that many ranks (EP4, EP8; default 2); tests of one
# mechanism between two ranks (a peer that skips a call, dies or comes late; the examples) stay on 2.
# DEEPEP_TEST_SHARE_GPU=1 (a machine with one GPU) runs the high-throughput, low-latency, interop, soak, layout, torch and
# bad-input suites with every rank on GPU 0, for correctness only: the script starts a CUDA MPS daemon of its own, gives
# each rank 80 / RANKS percent of the SMs, and stops it at the end; the suites that need a GPU per rank skip
# (tests/conftest.py says why). Not 100 / RANKS: with 50 % each, one rank's low-latency grid started only once the
# other's had timed out waiting for it (one H200, 2026-12-01); with 40 % or 25 % both grids ran together
# (docs/reliability.md). DEEPEP_TEST_MPS_PERCENT sets another share: with 4 ranks at 20 % each, one rank's low-latency
# combine grid started only once another rank's had timed out (one H200, 2026-12-02; every run), at 12 % each all ran
# together, while the high-throughput suite passed at 20 % (its 24-block grids need 24 SMs per rank).
set -uo pipefail
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} PYTHONUNBUFFERED=1
# Per-rank scenario logs go to a scratch folder and travel as one archive ($LOG/logs.tar.gz): the device tool brings
# back at most 8 files.
LOG=${OUT:-/tmp}
export DEEPEP_TEST_LOG_DIR=$(mktemp -d)
PY=${PYTHON:-python3}
nvidia-smi -L
if [ "${DEEPEP_TEST_SHARE_GPU:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d) CUDA_MPS_LOG_DIRECTORY=$(mktemp -d)
  export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${DEEPEP_TEST_MPS_PERCENT:-$(( 80 / ${DEEPEP_TEST_RANKS:-2} ))}
  nvidia-cuda-mps-control -d || { echo "DEEPEP_TEST_SHARE_GPU=1 needs CUDA MPS (nvidia-cuda-mps-control)"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
  echo "== every rank on GPU 0 under MPS, each with $CUDA_MPS_ACTIVE_THREAD_PERCENTAGE % of its SMs"
fi
echo "== build"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps . > "$LOG/build.log" 2>&1; then
  tail -60 "$LOG/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
# The exit status is the tests' (and 1 for a non-deepep exported symbol or no GPU seen), not the archiving's.
rc=0
echo "== exported symbols"
LIBDIR=$(cd /tmp && $PY -m pydeepep --lib-dir)
SYMBOLS=$DEEPEP_TEST_LOG_DIR/symbols.txt
nm -D --defined-only "$LIBDIR/libdeepep.so" | awk '{print $3}' > "$SYMBOLS"
if [ "${PIPESTATUS[0]}" != 0 ] || [ ! -s "$SYMBOLS" ]; then
  echo "could not list libdeepep.so's exported symbols (nm)"; rc=1
elif grep -v '^deepep' "$SYMBOLS"; then
  echo "NON-deepep SYMBOLS EXPORTED"; rc=1
else
  echo "all $(wc -l < "$SYMBOLS") exported symbols start with deepep"
fi
# A GPU machine whose driver the tests cannot reach would skip every GPU test and look like a pass.
if ! (cd /tmp && $PY -c "from pydeepep.launch import local_device_count as n; assert n() > 0, 'no GPU seen'"); then
  echo "pydeepep sees no GPU here: the GPU tier cannot run"; rc=1
# Nor would one with fewer GPUs than ranks: the multi-rank suites would skip (unless the ranks share a GPU).
elif [ "${DEEPEP_TEST_SHARE_GPU:-0}" != 1 ] && ! (cd /tmp && $PY -c "
from pydeepep.launch import local_device_count as n
ranks = int('${DEEPEP_TEST_RANKS:-2}')
assert n() >= ranks, f'{n()} GPU(s) for {ranks} ranks'"); then
  echo "fewer GPUs than DEEPEP_TEST_RANKS: the multi-rank suites would skip (DEEPEP_TEST_SHARE_GPU=1 on one GPU)"; rc=1
fi
echo "== tests"
# Here a test that would skip for a missing package or tool fails instead (tests/conftest.py, skip_missing); a module
# that fails so while collected (the adapter suite without PyTorch) is an error, and the other modules still run.
export DEEPEP_TEST_GPU_TIER=1
# PYTHONSAFEPATH (Python 3.11+): the installed package, not the checkout's pydeepep/ (which 3.10 imports, and which
# takes its modules from the installed copy).
PYTHONSAFEPATH=1 $PY -m pytest -p no:cacheprovider --continue-on-collection-errors -rA -q "${@:-tests}" 2>&1 | tee "$LOG/tests.log" | tail -80
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 0 ] || rc=$tests_rc
tar -czf "$LOG/logs.tar.gz" -C "$DEEPEP_TEST_LOG_DIR" . && rm -rf "$DEEPEP_TEST_LOG_DIR"
exit $rc
