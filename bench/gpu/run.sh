#!/usr/bin/env bash
# Every GPU measurement of sparsefast in one budgeted call (a lent H100/H200 session has ~15 min of device time;
# one command may run 10 min). One global deadline (DEADLINE_S, default 480 s); stages run in order of value, each
# with its own cap, each packing its logs and JSON into $OUT/results.tgz the moment it ends; a stage whose minimum
# does not fit in the time left is skipped, and summary.txt says so. $OUT receives exactly three files:
# summary.txt, env.json and results.tgz (the device runner returns at most 8).
#
#   OUT=/some/dir bash bench/gpu/run.sh            on the GPU machine (from the repo root or anywhere)
#   bash bench/gpu/run.sh --dry-run               here, without CUDA: every stage's command on tiny shapes
#
# Stages: 1 env + extension build for this device's arch only; 2 GPU correctness of every kernel (one pytest
# process per file); 3 Wanda mask microbenchmark (LLaMA-7B/70B shapes) + end-to-end pruning speed on a
# LLaMA-7B-shaped random bf16 model (LAYERS decoder layers, default 4); 4 2:4 matmul at M in {1,16,2048} on the
# 7B/70B shapes vs cuBLAS and cuSPARSELt, writing the Sparse24Linear dispatch table; 5 end-to-end decode
# (dense / 2:4, compiled and eager step) on a LLaMA-7B-shaped random bf16 model; 6 structured gather vs index_select.
# Random weights throughout: timings do not depend on the values (every JSON says so).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
DEADLINE_S="${DEADLINE_S:-480}"
RET="${OUT:-$PWD/out-gpu}"           # what comes back to the caller
mkdir -p "$RET"
WORK="$(mktemp -d)"                  # everything the stages write; packed into $RET/results.tgz
export OUT="$WORK/json"              # the benchmarks copy their JSON here (sparsefast.bench.results.write_result)
mkdir -p "$OUT" bench/results
PY="${PYTHON:-python3}"
T0=$(date +%s)
SUMMARY="$RET/summary.txt"
: > "$SUMMARY"
unset SPARSEFAST_BACKEND
# PYTHONPATH: the clone's sparsefast (built in place below) where it is not pip-installed; the scripts import only
# sparsefast.bench, never each other (bench/ is not a package: `bench` is an unrelated PyPI project)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS="${MAX_JOBS:-16}"
if [ $DRY -eq 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 BENCH_RESULTS_DIR="$WORK/results-dry-run"
  LAYERS=1; E2E_MODEL=llama-tiny-random; TEST_MARK="not gpu and not cuda_ext and not slow"
  CAP_SCALE=4  # the Triton interpreter on a CPU is slow; dry-run timings mean nothing anyway
else
  unset TRITON_INTERPRET
  LAYERS="${LAYERS:-4}"; E2E_MODEL=llama-7b-random; TEST_MARK="gpu or cuda_ext"
  CAP_SCALE=1
fi
# pytest without the repo's CPU addopts (they deselect the GPU tests and name pytest-benchmark's options)
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -q -rfEs)
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then BENCH_FLAGS=(--benchmark-disable); else BENCH_FLAGS=(); fi

left() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }
say() { echo "$*" | tee -a "$SUMMARY"; }
pack() {  # atomically, so a kill mid-pack still leaves the previous archive
  tar czf "$RET/.results.tgz.partial" -C "$WORK" . && mv -f "$RET/.results.tgz.partial" "$RET/results.tgz"
}
stage() {  # stage NAME CAP MIN CMD...: skipped unless MIN s are left; killed after min(CAP, time left) s
  local name="$1" cap=$(( $2 * CAP_SCALE )) min="$3"; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$min" ]; then say "=== $name: SKIPPED ($l s left, needs $min s)"; return 0; fi
  local limit=$(( cap < l ? cap : l )) t0; t0=$(date +%s)
  say "=== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local why=""
  [ $rc -eq 124 ] && why=" (TIMED OUT)"
  [ $rc -eq 5 ] && why=" (no test selected: none of this file's tests applies here)"
  say "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s$why"
  tail -n 15 "$WORK/$name.log"
  pack
}

# 1. environment and the extension, for this device's arch only
"$PY" bench/gpu/env_info.py > "$RET/env.json" 2> "$WORK/env.err"
cp "$RET/env.json" "$WORK/env.json"
cat "$RET/env.json"
if [ $DRY -eq 0 ]; then
  SPARSEFAST_CUDA_ARCHS="$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); \
print(f'{a}{b}' + ('a' if a >= 9 else ''))")"
  export SPARSEFAST_CUDA_ARCHS SPARSEFAST_BUILD_CUDA=1
  say "arch: $SPARSEFAST_CUDA_ARCHS"
fi
stage build 240 60 "$PY" setup.py build_ext --inplace
"$PY" -c "from sparsefast._ext import load_extension, extension_error; e = load_extension(); \
print('extension:', e.__file__ if e else 'NOT loaded: ' + str(extension_error()))" 2>&1 | tee -a "$SUMMARY"

# 2. correctness of every GPU kernel against its torch twin, one process per file
for f in tests/ops/test_wanda_mask.py tests/ops/test_sq_norm.py tests/ops/test_sparse24.py \
         tests/nn/test_sparse24_linear.py tests/ops/test_structured_gather.py; do
  stage "test-$(basename "$f" .py)" 60 20 "$PY" -X faulthandler "${PYTEST[@]:1}" -m "$TEST_MARK" "$f"
done

# 3. Wanda: mask microbenchmark on the LLaMA-7B and 70B shapes, then end-to-end pruning speed
export BENCH_MODELS="llama-7b,llama-70b"
stage wanda-micro 150 60 "${PYTEST[@]}" -s "${BENCH_FLAGS[@]}" bench/micro/bench_wanda_mask.py \
  bench/micro/bench_sq_norm.py
E2E_ARGS=("$E2E_MODEL" --layers "$LAYERS")
[ $DRY -eq 1 ] && E2E_ARGS+=(--device cpu --nsamples 2 --seqlen 16)
stage prune-e2e 150 60 "$PY" bench/e2e/bench_prune.py "${E2E_ARGS[@]}"

# 4. 2:4 matmul vs cuBLAS dense and cuSPARSELt; writes the dispatch table
S24_ARGS=(--models llama-7b,llama-70b --m-list 1,16,2048 --out "$OUT")
[ $DRY -eq 1 ] && S24_ARGS+=(--dry-run)
stage sparse24-matmul 120 45 "$PY" bench/micro/bench_sparse24_matmul.py "${S24_ARGS[@]}"

# 5. end-to-end decode: dense vs 2:4 (Sparse24Linear, the table of stage 4), bf16, compiled and eager step
table="$(ls -t "$OUT"/*-sparse24-dispatch.json 2>/dev/null | head -1)"
[ -n "$table" ] && export SPARSEFAST_SPARSE24_TABLE="$table"
DEC_ARGS=(--model "$([ $DRY -eq 1 ] && echo llama-tiny-random || echo llama-7b-random)" --out "$OUT")
[ $DRY -eq 1 ] && DEC_ARGS+=(--device cpu --dry-run) || DEC_ARGS+=(--device cuda --variants dense,2:4 --dtypes bfloat16 --rounds 3)
stage decode-e2e 150 60 "$PY" bench/e2e/bench_decode.py "${DEC_ARGS[@]}"

# 6. if time is left: structured gather vs index_select
stage structured-gather 60 25 "${PYTEST[@]}" -s "${BENCH_FLAGS[@]}" bench/micro/bench_structured_gather.py

say "total $(( $(date +%s) - T0 ))s of a ${DEADLINE_S}s deadline; files in $RET: $(ls "$RET" | tr '\n' ' ')"
