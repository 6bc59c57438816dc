"""End-to-end pruning-speed benchmark: `sparsefast bench prune` plus the bench/results JSON (device, versions,
commit). Arguments are those of `sparsefast bench prune`, e.g. on a GPU:

    python bench/e2e/bench_prune.py llama-7b-random --layers 4        # 128 × 2048 random ids, all four methods
    python bench/e2e/bench_prune.py smollm2 --nsamples 4 --seqlen 128  # CPU

Writes bench/results/<date>-<device>-prune-e2e.json (and a copy under $OUT when set).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "micro"))

from common import write_result  # noqa: E402

from sparsefast.cli import build_parser  # noqa: E402
from sparsefast.cli.bench import run_prune_bench  # noqa: E402


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", "prune", *argv])
    result = run_prune_bench(args)
    for path in write_result("prune-e2e", result):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
