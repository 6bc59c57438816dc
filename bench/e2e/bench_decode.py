"""Decode speed side by side in one run: sparsefast's engine (dense / Wanda 2:4 / Wanda 50% unstructured x float32 /
bfloat16 x eager / compiled step) and the engines a user would pick instead (llama.cpp on GGUF exports of the same
weights, vLLM's CPU backend), batch 1 and C concurrent requests, tokens/s and TPOT with weight GB/s against the copy
bandwidth measured in the same run. The same benchmark as `sparsefast bench decode` (sparsefast.bench.decode_run;
options: sparsefast.bench.decode_options). Writes bench/results/<date>-cpu-decode-<model>[-busy].json.

    python bench/e2e/bench_decode.py --llama-cpp ../peers/llama-cpp --vllm ../peers/vllm-cpu
    python bench/e2e/bench_decode.py --dry-run      # checks the harness in a few minutes; timings mean nothing
"""

from __future__ import annotations

import argparse
import sys

from sparsefast.bench.decode_options import add_decode_arguments, config_from_args
from sparsefast.bench.decode_run import run_decode_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    result = run_decode_bench(config_from_args(parser.parse_args(argv)))
    return 1 if result and result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
