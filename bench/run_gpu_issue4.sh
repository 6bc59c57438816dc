#!/usr/bin/env bash
# Issue 4, one GPU call (H100, < 8 min in all): build sparsefast._C for sm_90a, run the 2:4 GPU tests, run the
# benchmark, copy logs + JSON to $OUT. Every stage runs even when an earlier one failed; the final table always
# prints last (from the benchmark, or from its partial JSON if the benchmark was cut short).
#   OUT=$OUT bash bench/run_gpu_issue4.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" bench/results
export MAX_JOBS=16 SPARSEFAST_CUDA_ARCHS=90a SPARSEFAST_BUILD_CUDA=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
T0=$(date +%s)
left() { echo $(( 450 - ($(date +%s) - T0) )); }  # seconds left of a 7.5-minute plan
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  || echo "torch/CUDA check failed"

# 1. build (the ptxas report shows registers / spills per kernel)
build_rc=1
if timeout 240 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then build_rc=0; else
  echo "=== BUILD FAILED (rc=$?) ==="; grep -n "error" "$OUT/build.log" | head -40; tail -60 "$OUT/build.log"; fi
grep -E "registers|spill|stack frame" "$OUT/build.log" | sort | uniq -c | head -20
echo "build rc=$build_rc: $(( $(date +%s) - T0 )) s"
"$PY" -c "import torch, sparsefast._C as c; print('extension ok:', c.__file__)" || echo "extension NOT importable"

# 2. tests: one process per file, so a crash in one file cannot hide the other's results
t1=$(date +%s); test_rc=0
for f in tests/kernels/test_sparse24_matmul.py tests/nn/test_sparse24_linear.py; do
  b=$(basename "$f" .py)
  timeout 150 "$PY" -X faulthandler -m pytest -m "gpu or cuda_ext" -s -q -rfE -p no:cacheprovider "$f" \
    > "$OUT/pytest_$b.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && test_rc=$rc
  echo "=== $f rc=$rc (124 = timeout, 139 = segfault) ==="
  grep -E "^\[probe|^\[(decode|gemm|gemm_v1) .*(wrong|plan)|FAILED|ERROR|Fatal|Segmentation|passed|failed" \
    "$OUT/pytest_$b.log" | grep -v "\] ok" | head -40
done
grep -hE "ratio" "$OUT"/pytest_*.log | awk '{print $NF}' | sort -n | tail -1 | sed 's/^/worst error ratio vs torch: /'
echo "tests: $(( $(date +%s) - t1 )) s"

# 3. benchmark: stops starting new shapes when its budget is spent; writes its JSON after every shape
t2=$(date +%s)
budget=$(( $(left) - 40 )); [ $budget -lt 60 ] && budget=60
timeout $(( budget + 45 )) "$PY" bench/micro/bench_sparse24_matmul.py --bf16 --budget-s "$budget" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
latest=$(ls -t bench/results/*sparse24_matmul.json 2>/dev/null | head -1)
cp "$latest" bench/results/*sparse24_dispatch.json "$OUT/" 2>/dev/null || true
echo "=== bench rc=$bench_rc ($(( $(date +%s) - t2 )) s; budget $budget s) ==="
grep -vE "UserWarning|return cls\(|^ *$" "$OUT/bench.log" | grep -vE "^(shape|llama)" | tail -15
if grep -q "^shape (device ms" "$OUT/bench.log"; then
  sed -n '/^shape (device ms/,$p' "$OUT/bench.log"
elif [ -n "$latest" ]; then
  echo "(bench cut short: table from the partial JSON $latest)"
  "$PY" -c "import json, sys; sys.path.insert(0, 'bench/micro'); from bench_sparse24_matmul import print_table; \
print_table(json.load(open('$latest'))['results'])"
fi
echo "total: $(( $(date +%s) - T0 )) s; build rc=$build_rc tests rc=$test_rc bench rc=$bench_rc"
