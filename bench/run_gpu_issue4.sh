#!/usr/bin/env bash
# Issue 4, one GPU call (H100, < 9 min): build sparsefast._C for sm_90a, run the 2:4 GPU tests, run the benchmark,
# copy logs + JSON to $OUT. Prints the diagnostics and the final table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" bench/results
export MAX_JOBS=16 SPARSEFAST_CUDA_ARCHS=90a SPARSEFAST_BUILD_CUDA=1
PY="${PYTHON:-python3}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

t0=$(date +%s)
if ! timeout 330 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  echo "=== BUILD FAILED (last 120 lines of $OUT/build.log) ==="; grep -n "error" "$OUT/build.log" | head -40
  tail -120 "$OUT/build.log"; exit 1
fi
grep -E "registers|spill|stack frame" "$OUT/build.log" | sort | uniq -c | head -20
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -c "import torch, sparsefast._C as c; print('extension ok:', c.__file__)" || { tail -40 "$OUT/build.log"; exit 1; }

t1=$(date +%s)
timeout 240 "$PY" -m pytest -m "gpu or cuda_ext" -s -q -rfE -p no:cacheprovider \
  tests/kernels/test_sparse24_matmul.py tests/nn > "$OUT/pytest.log" 2>&1
test_rc=$?
echo "=== tests rc=$test_rc ($(( $(date +%s) - t1 )) s); diagnostics ==="
grep -E "^\[probe|^\[(decode|gemm) .*(wrong|plan)|FAILED|ERROR|Error|passed|failed" "$OUT/pytest.log" \
  | grep -v "\] ok" | head -60
grep -E "ratio" "$OUT/pytest.log" | sort -t' ' -k2 | awk '{print}' | tail -5

t2=$(date +%s)
timeout $(( 520 - (t2 - t0) > 60 ? 520 - (t2 - t0) : 60 )) "$PY" bench/micro/bench_sparse24_matmul.py --bf16 \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
cp bench/results/*sparse24* "$OUT/" 2>/dev/null || true
echo "=== bench rc=$bench_rc ($(( $(date +%s) - t2 )) s) ==="
tail -150 "$OUT/bench.log"
echo "total: $(( $(date +%s) - t0 )) s; tests rc=$test_rc bench rc=$bench_rc"
