# Sourced by the bench/run_gpu_issue*.sh scripts (from the repo root, with OUT set): the environment of a GPU run,
# pytest without the repo's CPU addopts, `part` (a time-limited, logged step) and the run's env.txt.
unset TRITON_INTERPRET SPARSEFAST_BACKEND
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}" SPARSEFAST_CUDA_ARCHS="${SPARSEFAST_CUDA_ARCHS:-90a}" SPARSEFAST_BUILD_CUDA=1
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
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
