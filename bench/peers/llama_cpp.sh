#!/usr/bin/env bash
# Make a virtual environment with llama-cpp-python (llama.cpp built from source) for side-by-side runs of exported
# GGUF files: the export equality check (bench/e2e/export_equality.py) and llama.cpp decode speed
# (bench/e2e/export_decode.py). Never part of CI's install.
#   bash bench/peers/llama_cpp.sh VENV
# Idempotent: a VENV whose llama_cpp already imports is left as it is. The package index is pip's configured one.
# The build compiles llama.cpp with this CPU's native instruction set (llama.cpp's default): about 10 minutes on
# 2 cores with nothing else running, during which it keeps both cores busy.
set -euo pipefail
if [ $# -ne 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/peers/llama_cpp.sh VENV   (VENV: the virtual environment to make or check)" >&2
  exit 2
fi
venv="$1"
version="0.3.36"  # the release this project's llama.cpp runs were made with (the deci architecture is in it)
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python already works in $venv: $("$venv/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# numpy: llama_cpp imports it; the build needs cmake (PyPI's wheel, so no system cmake is assumed)
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/python" -m pip install -q --no-cache-dir "llama-cpp-python==$version" numpy
"$venv/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed in', '$venv')"
