#!/usr/bin/env bash
# Runs compute-sanitizer (memcheck, racecheck, synccheck) over tiny workloads of 2 ranks, or 1 (dispatch layout, HT
# dispatch, HT combine, LL dispatch + combine) and prints one line per (tool, workload) with the error count; exits
# non-zero if any tool reports an error or any rank fails. Needs 2 GPUs (SANITIZER_RANKS=1: one). Logs go to
# $OUT/sanitizer (default /tmp/sanitizer).
#
# Usage (repo root): bash tests/run_sanitizer.sh
# Environment:
#   PYTHON                      interpreter with pydeepep's build and runtime dependencies (default python3)
#   DEEPEP_SANITIZER_INSTALLED  1: pydeepep is installed already, skip the build
#   SANITIZER_TOOLS             default "memcheck racecheck synccheck"
#   SANITIZER_WORKLOADS         default "layout ht_dispatch ht_combine ll"
#   SANITIZER_RANKS             ranks per workload (default 2, one per GPU; 1 runs the workloads on a communicator of
#                               one rank, which a machine with one GPU can: no peer traffic, the same kernels)
#   SANITIZER_RANK_TIMEOUT      seconds per rank and job before it is killed (default 900)
#   SANITIZER_COMM_TIMEOUT      the communicator timeout (default 300; kernels run far slower under the sanitizer)
#   SANITIZER_API_ERRORS        compute-sanitizer --report-api-errors: no (default), explicit or all
#   SANITIZER_EXTRA_ARGS        more compute-sanitizer options, e.g. "--print-limit 20"
#   COMPUTE_SANITIZER           the compute-sanitizer binary (default: PATH, then $CUDA_HOME/bin, /usr/local/cuda/bin)
set -uo pipefail
cd "$(dirname "$0")/.."
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none}
export NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/sanitizer
TOOLS=${SANITIZER_TOOLS:-memcheck racecheck synccheck}
WORKLOADS=${SANITIZER_WORKLOADS:-layout ht_dispatch ht_combine ll}
RANKS=${SANITIZER_RANKS:-2}
case $RANKS in
  1|2) ;;
  *) echo "SANITIZER_RANKS is $RANKS: 1 or 2" >&2; exit 2 ;;
esac
RANK_LIST=$(seq 0 $((RANKS - 1)))
RANK_TIMEOUT=${SANITIZER_RANK_TIMEOUT:-900}
COMM_TIMEOUT=${SANITIZER_COMM_TIMEOUT:-300}
API_ERRORS=${SANITIZER_API_ERRORS:-no}
read -r -a EXTRA <<< "${SANITIZER_EXTRA_ARGS:-}"

SANITIZER=${COMPUTE_SANITIZER:-}
if [ -z "$SANITIZER" ]; then
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then SANITIZER=$candidate; break; fi
  done
fi
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found: set COMPUTE_SANITIZER or CUDA_HOME" >&2; exit 2
fi
mkdir -p "$LOG"
nvidia-smi -L
"$SANITIZER" --version | tail -1

if [ "${DEEPEP_SANITIZER_INSTALLED:-0}" != 1 ]; then
  echo "== build"
  start=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps . > "$LOG/build.log" 2>&1; then
    tail -60 "$LOG/build.log"; exit 1
  fi
  echo "built in $(( $(date +%s) - start )) s"
fi
$PY -P -c "import pydeepep; print('pydeepep', pydeepep.__version__, 'from', pydeepep.__file__)" || exit 1

# Errors a sanitizer log reports: the sum of its "ERROR SUMMARY: N errors" lines (one per process), or failing that
# of the "(N errors" of racecheck's "RACECHECK SUMMARY: ... hazards displayed (N errors, M warnings)". Empty when the
# log holds no summary at all (the process did not finish).
count_errors() {
  local log=$1 total
  [ -f "$log" ] || return 0
  total=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | awk '{s += $3; n++} END {if (n) print s}')
  if [ -z "$total" ]; then
    total=$(grep -Eo 'RACECHECK SUMMARY: .*\([0-9]+ error' "$log" | grep -Eo '\([0-9]+' | tr -d '(' |
            awk '{s += $1; n++} END {if (n) print s}')
  fi
  echo "$total"
}

declare -a ROWS=()
failed=0
echo "== compute-sanitizer: tools [$TOOLS], workloads [$WORKLOADS], $RANKS rank(s), $RANK_TIMEOUT s per rank"
for tool in $TOOLS; do
  for workload in $WORKLOADS; do
    dir="$LOG/$tool-$workload"
    rm -rf "$dir" && mkdir -p "$dir"
    start=$(date +%s)
    pids=()
    # Every rank at once (NVSHMEM's bootstrap needs them all), each under its own sanitizer and time limit.
    for rank in $RANK_LIST; do
      timeout -k 30 "$RANK_TIMEOUT" "$SANITIZER" --tool "$tool" --target-processes all --error-exitcode 9 \
        --report-api-errors "$API_ERRORS" --log-file "$dir/rank$rank.sanitizer.log" ${EXTRA[@]+"${EXTRA[@]}"} \
        "$PY" -P tests/sanitizer_workload.py --rank "$rank" --nranks "$RANKS" --uid-file "$dir/job.id" \
        --workload "$workload" --timeout "$COMM_TIMEOUT" > "$dir/rank$rank.out" 2>&1 &
      pids+=($!)
    done
    rcs=()
    for pid in "${pids[@]}"; do
      wait "$pid"; rcs+=($?)
    done
    seconds=$(( $(date +%s) - start ))
    errors=0
    verdict=ok
    for rank in $RANK_LIST; do
      n=$(count_errors "$dir/rank$rank.sanitizer.log")
      if [ -z "$n" ]; then verdict="no sanitizer summary"; else errors=$(( errors + n )); fi
    done
    for i in $RANK_LIST; do
      case ${rcs[$i]} in
        0) ;;
        9) ;;  # errors found: counted above
        3) verdict="rank $i: results differ from the oracle" ;;
        124|137) verdict="rank $i: timed out after $RANK_TIMEOUT s" ;;
        *) verdict="rank $i: exit code ${rcs[$i]}" ;;
      esac
    done
    if [ "$verdict" = ok ] && { [ "$errors" -gt 0 ] || [[ " ${rcs[*]} " == *" 9 "* ]]; }; then
      verdict="ERRORS"
    fi
    exits=$(IFS=,; echo "${rcs[*]}")
    line=$(printf '%-10s %-12s errors %-5s ranks exit %-4s  %4s s  %s' "$tool" "$workload" "$errors" "$exits" \
           "$seconds" "$verdict")
    echo "$line"
    ROWS+=("$line")
    if [ "$verdict" != ok ]; then
      failed=1
      for rank in $RANK_LIST; do
        echo "  -- rank $rank output (last 15 lines):"; tail -15 "$dir/rank$rank.out" | sed 's/^/     /'
        echo "  -- rank $rank sanitizer log (first 40 lines): $dir/rank$rank.sanitizer.log"
        head -40 "$dir/rank$rank.sanitizer.log" 2>/dev/null | sed 's/^/     /'
      done
    fi
  done
done

echo
echo "== summary (logs in $LOG)"
printf '%-10s %-12s %s\n' tool workload result
for line in "${ROWS[@]}"; do echo "$line"; done
if [ "$failed" -ne 0 ]; then
  echo "FAILED: a tool reported errors or a rank failed"
  exit 1
fi
echo "all clean"
