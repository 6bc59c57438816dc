#!/usr/bin/env bash
# Make a virtual environment with lm-evaluation-harness 0.4.13 (its `hf` and `local-completions` models) on this
# project's CPU torch, for scoring `sparsefast serve` with the field's own harness next to `sparsefast eval`
# (bench/e2e/lm_eval_server.py). Never part of CI's install.
#   bash bench/peers/lm_eval.sh VENV
# Idempotent: a VENV whose lm_eval already imports is left as it is. The package index is pip's configured one.
# Why each step: torch is pinned to the CPU wheel the main venv uses (an unpinned torch pulls a CUDA build);
# transformers and tokenizers are pinned to the main venv's (.ci/constraints.txt), so that lm-eval's `hf` model and
# its `local-completions` tokenizer split text into exactly the ids `sparsefast eval` scores; lm-eval 0.4.13's HF
# backend loads with `dtype=` on transformers >= 4.56 and runs on 5.x. The extras: hf (transformers, accelerate,
# peft) and api (aiohttp, tenacity, requests: what local-completions sends requests with).
set -euo pipefail
if [ $# -ne 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/peers/lm_eval.sh VENV   (VENV: the virtual environment to make or check)" >&2
  exit 2
fi
venv="$1"
torch_version="2.13.0"
lm_eval_version="0.4.13"
transformers_version="5.25.0"
tokenizers_version="0.23.3"
check='import lm_eval, torch, transformers; from lm_eval.models import api_models, huggingface; print("lm_eval", lm_eval.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "lm-eval already works in $venv: $("$venv/bin/python" -c "$check" 2>/dev/null)"
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==$torch_version" "numpy>=1.24"
"${pip[@]}" "lm-eval[hf,api]==$lm_eval_version" "torch==$torch_version" "transformers==$transformers_version" \
  "tokenizers==$tokenizers_version"
"$venv/bin/python" -c "$check"
