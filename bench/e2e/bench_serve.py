"""Serving benchmark on SmolLM2-135M-Instruct, side by side in one run: `sparsefast serve` on the dense model, on a
20% block-wise structural checkpoint (LLM-Pruner, element1 importance) and on a Wanda 2:4 mask-pruned checkpoint,
and the same dense model under `transformers serve` (the peer), at each concurrency level.

Checkpoints are made under --ckpt-dir when missing, with the project's own commands:
  sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --out CKPT/smollm2-s20
  sparsefast prune smollm2 --method wanda --pattern 2:4 --nsamples 32 --seqlen 512 --out CKPT/smollm2-w24
  dense HF dir for transformers serve: load_model("smollm2") + sparsefast.checkpoint.save_checkpoint (fp32)
Then sparsefast.bench.serving_report (what `sparsefast bench serve` runs) measures them. Results:
bench/results/<date>-cpu-serve.json and .png (--out STEM elsewhere). Run it on a quiet machine: a server that
times its sparse-linear swap while loading needs one. Example:
  python bench/e2e/bench_serve.py --ckpt-dir /tmp/ckpt --concurrency 1,8 --rounds 2 --num-prompts 4,16
Exits 1 when any variant failed (the result still records the others).
`--plot-runs A.json B.json` merges runs that measured different concurrency levels into one plot, measuring nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from sparsefast.bench.results import result_path
from sparsefast.bench.serving_report import default_metadata, merge_runs, parse_int_list, plot, run_serving_benchmark


def prepare(ckpt: Path) -> dict[str, Path]:
    """The three checkpoint dirs (made when missing; an existing dir is used as it is)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    dirs = {"dense": ckpt / "smollm2-dense", "s20": ckpt / "smollm2-s20", "w24": ckpt / "smollm2-w24"}
    cli = [sys.executable, "-m", "sparsefast"]
    if not dirs["s20"].is_dir():
        subprocess.run(cli + ["prune-structured", "smollm2", "--ratio", "0.2", "--importance", "element1",
                              "--out", str(dirs["s20"]), "--no-progress"], check=True)
    if not dirs["w24"].is_dir():
        subprocess.run(cli + ["prune", "smollm2", "--method", "wanda", "--pattern", "2:4", "--nsamples", "32",
                              "--seqlen", "512", "--out", str(dirs["w24"])], check=True)
    if not dirs["dense"].is_dir():
        from sparsefast.checkpoint import save_checkpoint
        from sparsefast.models import load_model

        model, tok = load_model("smollm2")
        save_checkpoint(model, tok, dirs["dense"])
    return dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-runs", nargs="+", default=None, metavar="JSON",
                    help="no measurement: merge these result files (different concurrency levels) into one plot, "
                         "written to --out's .png")
    ap.add_argument("--ckpt-dir", default=None, help="where the pruned / dense checkpoints are (made if missing)")
    ap.add_argument("--concurrency", default="1,8", help="comma list of concurrency levels")
    ap.add_argument("--num-prompts", default=None, help="requests per level: one number or one per level")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true", help="leave out transformers serve")
    ap.add_argument("--peer-cb", action="store_true",
                    help="also run transformers serve --continuous-batching as a second peer")
    ap.add_argument("--out", default=None, help="result stem (default bench/results/<date>-cpu-serve)")
    args = ap.parse_args(argv)
    stem = args.out or str(result_path("serve", device="cpu").with_suffix(""))
    if args.plot_runs:
        plot(merge_runs(args.plot_runs), stem + ".png")
        print(f"wrote {stem}.png")
        return 0
    if args.ckpt_dir is None:
        ap.error("--ckpt-dir is required for a measurement")
    dirs = prepare(Path(args.ckpt_dir))
    variants = ["dense=sparsefast:smollm2", f"structural20=sparsefast:{dirs['s20']}",
                f"wanda24=sparsefast:{dirs['w24']}"]
    if not args.no_peer:
        variants.append(f"transformers-serve=transformers:{dirs['dense']}")
    if args.peer_cb:
        variants.append(f"transformers-serve-cb=transformers-cb:{dirs['dense']}")
    metadata = {**default_metadata(), "checkpoints": {k: str(v) for k, v in dirs.items()},
                "commands": ["sparsefast prune-structured smollm2 --ratio 0.2 --importance element1",
                             "sparsefast prune smollm2 --method wanda --pattern 2:4 --nsamples 32 --seqlen 512"]}
    num_prompts = parse_int_list(args.num_prompts, "--num-prompts") if args.num_prompts else None
    result = run_serving_benchmark(
        variants, concurrency=parse_int_list(args.concurrency, "--concurrency"), num_prompts=num_prompts,
        baseline="dense", peer=None if args.no_peer else "transformers-serve", rounds=args.rounds,
        prompt_len=args.prompt_len, output_len=args.output_len, json_path=stem + ".json", plot_path=stem + ".png",
        metadata=metadata, overwrite=True)  # today's result of this measurement replaces an earlier one
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
