#!/usr/bin/env bash
# Times variants of the library side by side in one run: each variant is this tree with sed expressions applied to
# libdeepep/*.cu (a tuning constant, say); all are built at once, then each in turn replaces the installed
# libdeepep.so and `python -m pydeepep.bench` runs with the same arguments. The installed library is put back at the
# end. Needs the GPUs the bench needs. Logs and JSON records go to $OUT/variants (default /tmp/variants); the
# variants' figures side by side (tests/compare_records.py) go to $OUT/variants.txt as each variant finishes, and to
# stdout at the end.
#
# Usage (repo root): bash tests/time_variants.sh [--bench "bench args"] NAME=EXPR[;EXPR...] ...
#   NAME=          the tree as it is (a baseline; give it first for a fair start)
#   NAME=EXPR;...  sed -E substitutions (s/old/new/), applied in order to every libdeepep/*.cu file; one that
#                  matches nothing fails the variant
#   NAME=@DIR      the files under DIR (a folder laid out like the repository, inside it and not ignored by git so
#                  that it travels to a GPU machine) replace the tree's own: another branch's kernels, say, made with
#                  `mkdir -p v/other && git archive other libdeepep | tar -x -C v/other`
# Example (how the HT warp splits in docs/tuning.md were chosen):
#   bash tests/time_variants.sh --bench "--modes ht --tokens 4096 --sms 24 --no-floor" base= \
#     push14='s/kDispatchPushWarpsLargeRows = 12/kDispatchPushWarpsLargeRows = 14/'
# Every variant is checked before anything is installed or built (each expression a whole s/old/new/ that matches
# something, each folder present); `--check` (first argument) only checks them, on any machine. A ';' inside an
# expression splits it: match it with . in the pattern and write it as \x3b in the replacement.
# Environment: PYTHON (default python3); DEEPEP_VARIANTS_INSTALLED=1 skips installing the tree first.
set -uo pipefail
cd "$(dirname "$0")/.."
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_REMOTE_TRANSPORT=${NVSHMEM_REMOTE_TRANSPORT:-none} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp}/variants
BENCH_ARGS="--modes ht --tokens 4096 --sms 24 --no-floor"
CHECK_ONLY=0
if [ "${1:-}" = "--check" ]; then
  CHECK_ONLY=1
  shift
fi
if [ "${1:-}" = "--bench" ]; then
  BENCH_ARGS=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [--check] [--bench \"bench args\"] NAME=EXPR[;EXPR...] ..." >&2; exit 2; }
ROOT=$(pwd)

# Prints what is wrong with a variant's expressions (';'-separated) or folder; fails if anything is.
check_variant() {  # name, expressions
  local name=$1 exprs=$2 expr
  if [ "${exprs:0:1}" = @ ]; then
    [ -d "$ROOT/${exprs:1}" ] && return 0
    echo "variant $name: no folder $ROOT/${exprs:1}"
    return 1
  fi
  # Applied in order to a scratch copy, as the build applies them: a later expression may match what an earlier wrote.
  local scratch
  scratch=$(mktemp -d) && cp "$ROOT"/libdeepep/*.cu "$scratch"/ || return 1
  IFS=';' read -r -a list <<< "$exprs"
  for expr in "${list[@]}"; do
    [ -n "$expr" ] || continue
    if ! echo | sed -E "$expr" > /dev/null 2>&1; then
      echo "variant $name: '$expr' is not a whole s/old/new/ expression (a ';' inside one splits it: match it with ." \
        "in the pattern, write it as \\x3b in the replacement)"
      rm -rf "$scratch"
      return 1
    fi
    if ! grep -qE "$(echo "$expr" | sed -E 's#^s/([^/]*)/.*#\1#')" "$scratch"/*.cu; then
      echo "variant $name: '$expr' matches nothing in libdeepep/*.cu"
      rm -rf "$scratch"
      return 1
    fi
    sed -i -E "$expr" "$scratch"/*.cu
  done
  rm -rf "$scratch"
}
bad=0
for spec in "$@"; do
  check_variant "${spec%%=*}" "${spec#*=}" || bad=1
done
[ $bad = 0 ] || exit 2
[ $CHECK_ONLY = 0 ] || { echo "all $# variants check out"; exit 0; }
mkdir -p "$LOG"

if [ "${DEEPEP_VARIANTS_INSTALLED:-0}" != 1 ]; then
  $PY -m pip install --no-build-isolation --no-deps . > "$LOG/install.log" 2>&1 || { tail -30 "$LOG/install.log"; exit 1; }
fi
LIBDIR=$(cd /tmp && $PY -m pydeepep --lib-dir) || exit 1
INSTALLED=$(mktemp -d)
cp -a "$LIBDIR"/libdeepep.so* "$INSTALLED"/

build_variant() {  # name, expressions (';'-separated)
  local name=$1 exprs=$2 src=$LOG/src_$1
  rm -rf "$src" && mkdir -p "$src"
  tar --exclude=./build --exclude=./.git -C "$ROOT" -cf - . | tar -xf - -C "$src"
  if [ "${exprs:0:1}" = @ ]; then
    cp -a "$ROOT/${exprs:1}"/. "$src"/
    exprs=
  fi
  local expr
  IFS=';' read -r -a list <<< "$exprs"
  for expr in "${list[@]}"; do
    [ -n "$expr" ] && sed -i -E "$expr" "$src"/libdeepep/*.cu
  done
  mkdir -p "$src/b" && cd "$src/b" &&
    cmake .. -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$PY" > "$LOG/$name.build.log" 2>&1 &&
    ninja deepep >> "$LOG/$name.build.log" 2>&1
}

names=()
for spec in "$@"; do
  name=${spec%%=*}
  names+=("$name")
  build_variant "$name" "${spec#*=}" &
done
wait

# The finished variants side by side in $OUT/variants.txt (next to the folder, so that it is among the first files a
# device run brings back), rewritten after each one so that a run cut short still leaves what it measured.
summarise() {
  local records=() name
  for name in "${names[@]}"; do
    [ -f "$LOG/$name.json" ] && records+=("$name=$LOG/$name.json")
  done
  [ ${#records[@]} -eq 0 ] || $PY "$ROOT/tests/compare_records.py" "${records[@]}" > "$LOG.txt"
}

cd /tmp
rm -f "$LOG.txt"
for name in "${names[@]}"; do rm -f "$LOG/$name.json"; done  # records left by an earlier run are not these variants'
for name in "${names[@]}"; do
  so=$(ls "$LOG/src_$name/b"/libdeepep.so.*.*.* 2> /dev/null | head -1)
  if [ -z "$so" ]; then
    echo "== $name: build failed ($LOG/$name.build.log)"
    tail -3 "$LOG/$name.build.log"
    continue
  fi
  for f in "$LIBDIR"/libdeepep.so*; do cp -f "$so" "$f"; done
  # shellcheck disable=SC2086  # the bench arguments are meant to split
  $PY -m pydeepep.bench $BENCH_ARGS --output "$LOG/$name.json" > "$LOG/$name.txt" 2>&1
  rc=$?
  echo "== $name (rc $rc)"
  [ $rc = 0 ] || tail -5 "$LOG/$name.txt"
  summarise
done
cp -a "$INSTALLED"/libdeepep.so* "$LIBDIR"/
rm -rf "$INSTALLED"
if [ -f "$LOG.txt" ]; then cat "$LOG.txt"; fi
