"""Serving benchmark on SmolLM2-135M-Instruct, side by side in one run: `sparsefast serve` on the dense model, on a
20% block-wise structural checkpoint (LLM-Pruner, element1 importance) and on a Wanda 2:4 mask-pruned checkpoint,
and the same dense model under `transformers serve` (the peer), at each concurrency level.

Checkpoints are made under --ckpt-dir when missing, with the project's own commands:
  sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --out CKPT/smollm2-s20
  sparsefast prune smollm2 --method wanda --pattern 2:4 --nsamples 32 --seqlen 512 --out CKPT/smollm2-w24
  dense HF dir for transformers serve: load_model("smollm2") + sparsefast.checkpoint.save_checkpoint (fp32)
Then `sparsefast bench serve` does the measurement (sparsefast.serve.benchmark). Results: bench/results/
<date>-cpu-serve.json and .png. Example:
  bash /tmp/quiet.sh .venv/bin/python bench/e2e/bench_serve.py --ckpt-dir /tmp/ckpt --concurrency 1,8
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.micro.common import cpu_info, git_commit  # noqa: E402


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


def merge(paths: list[str]) -> dict:
    """One result from runs that measured different concurrency levels of the same variants (each level's
    variants were measured side by side within its run); the settings and ratios of each run are kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: runs[0][k] for k in ("what", "machine", "versions", "settings")}
    merged["settings"] = {**merged["settings"], "concurrency": sorted({c for r in runs for c in r["settings"]
                                                                        ["concurrency"]})}
    merged["runs"] = [{"file": p, "date": r["date"], "git_commit": r["git_commit"], "settings": r["settings"],
                       "ratios": r["ratios"]} for p, r in zip(paths, runs)]
    by_name: dict[str, dict] = {}
    for r in runs:
        for v in r["variants"]:
            entry = by_name.setdefault(v["name"], {**v, "levels": {}})
            entry["levels"].update(v["levels"])
    merged["variants"] = list(by_name.values())
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-runs", nargs="+", default=None, metavar="JSON",
                    help="no measurement: merge these result files (different concurrency levels) into one plot, "
                         "written to --out's .png")
    ap.add_argument("--ckpt-dir", default=None, help="where the pruned / dense checkpoints are (made if missing)")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--num-prompts", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-peer", action="store_true", help="leave out transformers serve")
    ap.add_argument("--peer-cb", action="store_true",
                    help="also run transformers serve --continuous-batching as a second peer")
    ap.add_argument("--out", default=None, help="result stem (default bench/results/<date>-cpu-serve)")
    args = ap.parse_args(argv)
    stem = args.out or str(REPO / "bench" / "results" / f"{datetime.date.today():%F}-cpu-serve")
    if args.plot_runs:
        from sparsefast.cli.bench_serve import plot

        plot(merge(args.plot_runs), stem + ".png")
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
    from sparsefast.cli import build_parser
    from sparsefast.cli.bench_serve import default_metadata, run

    cli = ["bench", "serve", "--baseline", "dense", "--concurrency", args.concurrency,
           "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--rounds", str(args.rounds),
           "--json", stem + ".json", "--plot", stem + ".png"]
    if args.num_prompts:
        cli += ["--num-prompts", args.num_prompts]
    if not args.no_peer:
        cli += ["--peer", "transformers-serve"]
    for v in variants:
        cli += ["--variant", v]
    parsed = build_parser().parse_args(cli)
    metadata = default_metadata()
    metadata.update(machine=cpu_info(), git_commit=git_commit(),
                    checkpoints={k: str(v) for k, v in dirs.items()},
                    commands=["sparsefast prune-structured smollm2 --ratio 0.2 --importance element1",
                              "sparsefast prune smollm2 --method wanda --pattern 2:4 --nsamples 32 --seqlen 512"])
    return run(parsed, metadata)


if __name__ == "__main__":
    raise SystemExit(main())
