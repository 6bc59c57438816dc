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
source bench/gpu_common.sh
LAYERS="${LAYERS:-4}"
start_all=$(date +%s)

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
