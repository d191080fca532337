#!/usr/bin/env bash
# Builds pydeepep from source on a GPU machine and runs the GPU tier and the examples; logs go to $OUT if set.
# Usage (repo root): bash tests/run_gpu_tier.sh [pytest args, default: tests]
set -uo pipefail
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}
export DEEPEP_TEST_LOG_DIR=$LOG
PY=${PYTHON:-python3}
nvidia-smi -L
echo "== build"
start=$(date +%s)
if ! $PY -m pip install --no-build-isolation --no-deps . > "$LOG/build.log" 2>&1; then
  tail -60 "$LOG/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
echo "== exported symbols"
LIBDIR=$(cd /tmp && $PY -m pydeepep --lib-dir)
nm -D --defined-only "$LIBDIR/libdeepep.so" | awk '{print $3}' | tee "$LOG/symbols.txt" | grep -v '^deepep' && echo "NON-deepep SYMBOLS EXPORTED" || echo "all $(wc -l < "$LOG/symbols.txt") exported symbols start with deepep"
echo "== tests"
$PY -P -m pytest -p no:cacheprovider -rA -q "${@:-tests}" 2>&1 | tee "$LOG/tests.log" | tail -80
