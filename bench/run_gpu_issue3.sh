#!/usr/bin/env bash
# Issue 3 on one GPU, in one go (< 8 min on an H100): GPU correctness tests of the triton Wanda/sq_norm kernels,
# the microbenchmarks (LLaMA shapes; triton vs torch twin vs published Wanda vs SparseGPT), and the end-to-end
# pruning-speed benchmark (LLaMA-7B-shaped random bf16 model, LAYERS decoder layers, 128 x 2048 random ids).
# Each part has its own time limit and the script goes on when one fails; logs, JSON and summary.txt go to $OUT
# (default ./out-issue3) and the JSON also to bench/results/.
#   usage: bash bench/run_gpu_issue3.sh            env: LAYERS (default 4), OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out-issue3}"
export OUT
mkdir -p "$OUT" bench/results
unset TRITON_INTERPRET SPARSEFAST_BACKEND
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
LAYERS="${LAYERS:-4}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
start_all=$(date +%s)

# pytest-benchmark may be missing on the device: then clear the repo's addopts (they name its options)
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -q -rfEs)
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then BENCH_FLAGS=(--benchmark-disable); else BENCH_FLAGS=(); fi

part() {  # part NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record rc and duration
  local name="$1" limit="$2"; shift 2
  local t0; t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
  tail -n 25 "$OUT/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
  git rev-parse HEAD 2>/dev/null || echo "no git commit"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness on the GPU (~21 kernel compiles + exact comparisons at every LLaMA shape)
part gpu_tests 170 "${PYTEST[@]}" -m gpu tests/kernels/test_wanda_mask.py tests/kernels/test_sq_norm.py \
  --junitxml="$OUT/gpu_tests.xml"
# 2. microbenchmarks (writes bench/results/<date>-<device>-{wanda-mask,sq-norm}.json, copies in $OUT)
part micro 170 "${PYTEST[@]}" -s "${BENCH_FLAGS[@]}" bench/micro/bench_wanda_mask.py bench/micro/bench_sq_norm.py
# 3. end-to-end pruning speed (writes bench/results/<date>-<device>-prune-e2e.json, copy in $OUT)
part e2e_prune 170 "$PY" bench/e2e/bench_prune.py llama-7b-random --layers "$LAYERS"

for f in "$OUT"/*.log "$OUT"/summary.txt "$OUT"/env.txt; do
  [ -f "$f" ] && cp -f "$f" "bench/results/$(date +%F)-issue3-$(basename "$f")"
done
echo "total $(( $(date +%s) - start_all ))s; results in $OUT and bench/results/" | tee -a "$SUMMARY"
