"""End-to-end pruning-speed benchmark: `sparsefast bench prune` (sparsefast.bench.prune_speed) written as a
bench/results JSON with the run metadata (device, versions, commit, load). Arguments are those of
`sparsefast bench prune`, e.g. on a GPU:

    python bench/e2e/bench_prune.py llama-7b-random --layers 4        # 128 × 2048 random ids, all four methods
    python bench/e2e/bench_prune.py smollm2 --nsamples 4 --seqlen 128  # CPU

Writes bench/results/<date>-<device>-prune-e2e.json (and a copy under $OUT when set); exits 1 when a method failed.
"""

from __future__ import annotations

import sys

from sparsefast.bench.prune_speed import run_prune_bench
from sparsefast.bench.results import write_result
from sparsefast.cli import build_parser
from sparsefast.cli.bench import prune_options


def main(argv: list[str]) -> int:
    options = prune_options(build_parser().parse_args(["bench", "prune", *argv]))
    result = run_prune_bench(**options)
    device = "cpu" if result["device"] == "cpu" else "cuda"
    for path in write_result("prune-e2e", result, device=device):
        print(f"wrote {path}")
    return 1 if result["failed"] else 0  # the methods that ran are still in the result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
