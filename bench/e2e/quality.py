"""Quality of the mask pruners (magnitude / Wanda / SparseGPT / RIA, each optionally with OWL's layer-wise
sparsity and DSnoT's refinement) on SmolLM2-135M-Instruct (the embedded default model), on CPU.

Protocol (issue 2, part 9): C4 calibration nsamples × seqlen (default 128 × 512, --seed 0, Wanda's sampler), the same
calibration ids for every method; WikiText-2 perplexity with the "gptq" protocol (full test set, non-overlapping
windows of --eval-seqlen=512, tail dropped); dense first, then every pattern (× sparsity for unstructured) × method
from the dense weights. A method is a pruner name with optional "+owl" (allocation) and "+dsnot" (refinement), e.g.
"wanda+owl+dsnot"; "+owl" applies to unstructured patterns only (N:M runs skip it); "+int8" also quantizes the kept
weights (per-row int8, inside SparseGPT's sweep, after the mask otherwise; unstructured sparsity 0 = int8 alone).
Prune times split into calibration forward (incl. statistics hooks; OWL's extra pass is reported separately) and
metric+mask (Wanda's pruning time; DSnoT's swaps and RIA's reallocation are inside it).

    python bench/e2e/quality.py                    # writes bench/results/<date>-cpu-smollm2-quality.json
    python bench/e2e/quality.py --methods wanda,wanda+owl,sparsegpt,sparsegpt+owl --patterns unstructured \
        --sparsities 0.7

The JSON is rewritten after every run, so an interrupted benchmark keeps what it measured; `--resume` continues it
(runs already in --out with the same calibration and evaluation settings are kept, not repeated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sparsefast.bench.results import commit_of, result_path, run_metadata


def parse_method(spec: str) -> tuple[str, dict]:
    """"wanda+owl+dsnot" -> ("wanda", {"allocation": "owl", "refine": "dsnot"}); ValueError on an unknown part."""
    from sparsefast.config import METHODS

    name, *mods = spec.strip().split("+")
    unknown = [m for m in mods if m not in ("owl", "dsnot", "int8")]
    if name not in METHODS or unknown or len(set(mods)) != len(mods):
        raise ValueError(f"method {spec!r}: use METHOD[+owl][+dsnot][+int8] with METHOD one of {', '.join(METHODS)}")
    return name, {**({"allocation": "owl"} if "owl" in mods else {}),
                  **({"refine": "dsnot"} if "dsnot" in mods else {}),
                  **({"quantize": "int8"} if "int8" in mods else {})}


def main(argv: list[str] | None = None) -> int:
    from sparsefast.api import evaluate, prune, versions
    from sparsefast.checkpoint import write_json
    from sparsefast.config import make_config
    from sparsefast.data import get_calibration
    from sparsefast.models import load_model
    from sparsefast.ops.int8_rows import drop_int8_scales

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (a repeat with another draw)")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="comma list of METHOD[+owl][+dsnot][+int8], METHOD one of magnitude, wanda, sparsegpt, ria")
    p.add_argument("--patterns", default="unstructured,4:8,2:4")
    p.add_argument("--sparsities", default="0.5", help="comma list, for the unstructured pattern")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate only the first N windows (a check of the harness; not the protocol)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true", help="keep the runs already measured in --out")
    p.add_argument("--no-dense", action="store_true",
                   help="skip the dense model's evaluation (a repeat, e.g. with another --seed: the dense perplexity "
                        "does not depend on the calibration draw)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else result_path(f"{Path(args.model).name}-quality", device=args.device)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - t0
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = get_calibration("c4", tok, args.nsamples, args.seqlen, seed=args.seed, data_dir=args.data_dir)
    result = {
        "what": "WikiText-2 perplexity (gptq protocol) of SmolLM2-135M-Instruct pruned one-shot",
        "model": args.model, "model_dtype": str(next(model.parameters()).dtype),
        "model_load_s": load_s, "device": args.device, "metadata": run_metadata(args.device), "versions": versions(),
        "command": " ".join([sys.executable, *sys.argv]),
        "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "eval": {"dataset": "wikitext2", "protocol": "gptq", "seqlen": args.eval_seqlen,
                 "max_windows": args.eval_windows}, "runs": [],
    }
    if args.resume and out.exists():
        import json

        previous = json.loads(out.read_text())
        for key in ("model", "calibration", "eval"):
            if previous[key] != result[key]:
                p.error(f"--resume: {out} has {key}={previous[key]!r}, this run has {result[key]!r}; "
                        f"use another --out or the same settings")
        result["runs"] = previous["runs"]
        result["resumed_from_commits"] = [*previous.get("resumed_from_commits", []), commit_of(previous)]
    done = {(r["method"], r["pattern"], r["sparsity"]) for r in result["runs"]}
    specs = [parse_method(m) for m in args.methods.split(",")]  # every bad name fails here, before any work
    cases = [(pattern, float(s) if pattern == "unstructured" else None) for pattern in args.patterns.split(",")
             for s in (args.sparsities.split(",") if pattern == "unstructured" else [None])]
    # every config made (and so checked) before any work; OWL applies to unstructured patterns only
    runs = [(method, pattern, make_config(name, pattern=pattern, sparsity=sparsity, nsamples=args.nsamples,
                                          seqlen=args.seqlen, device=args.device, **extra))
            for pattern, sparsity in cases for method, (name, extra) in zip(args.methods.split(","), specs)
            if pattern == "unstructured" or extra.get("allocation") != "owl"]

    def ppl() -> tuple[float, float]:
        t = time.perf_counter()
        value = evaluate(model, tok, ["wikitext2"], seqlen=args.eval_seqlen, data_dir=args.data_dir,
                         device=args.device, max_windows=args.eval_windows)["wikitext2"]
        return float(value), time.perf_counter() - t

    if ("dense", "-", 0.0) not in done and not args.no_dense:
        dense_ppl, eval_s = ppl()
        result["runs"].append({"method": "dense", "pattern": "-", "sparsity": 0.0, "wikitext2_ppl": dense_ppl,
                               "eval_s": eval_s})
        print(f"dense: wikitext2 ppl {dense_ppl:.3f} (eval {eval_s:.0f} s)", flush=True)
        write_json(out, result)
    for method, pattern, cfg in runs:
        if (method, pattern, cfg.target_sparsity) in done:
            continue
        drop_int8_scales(model)  # a +int8 run's scales: the dense weights come back next
        model.load_state_dict(dense_state)
        rep = prune(model, cfg, calib, progress=False)
        value, eval_s = ppl()
        t = rep["timings"]
        run = {"method": method, "pattern": pattern, "sparsity": rep["requested_sparsity"],
               "achieved_sparsity": rep["achieved_sparsity"], "wikitext2_ppl": value, "eval_s": eval_s,
               "prune_total_s": t["total_s"], "calib_forward_s": t["calib_forward_s"], "stats_s": t["stats_s"],
               "metric_mask_s": t["metric_mask_s"], "owl_outlier_pass_s": t.get("owl_outlier_pass_s"),
               "allocation": rep["allocation"], "damping": rep.get("damping"),
               "dsnot_swaps": (sum(s.get("dsnot_swaps", 0) for s in rep["linears"].values()) if cfg.refine
                               else None),
               "reallocated": [n for n, s in rep["linears"].items() if s.get("reallocation", {}).get("applied")]}
        result["runs"].append(run)
        write_json(out, result)
        print(f"{method} {pattern} {cfg.target_sparsity:g}: wikitext2 ppl {value:.3f}, sparsity "
              f"{rep['achieved_sparsity']:.4f}, prune {t['total_s']:.1f} s (calib fwd "
              f"{t['calib_forward_s']:.1f} s, metric+mask {t['metric_mask_s']:.1f} s), eval {eval_s:.0f} s",
              flush=True)
    result["total_s"] = time.perf_counter() - t0
    write_json(out, result)
    print("\n| method | pattern | sparsity | WikiText-2 ppl | calib forward s | metric+mask s |")
    print("|---|---|---|---|---|---|")
    for r in result["runs"]:
        print(f"| {r['method']} | {r['pattern']} | {r.get('achieved_sparsity', 0.0):.3f} | {r['wikitext2_ppl']:.2f} | "
              f"{r.get('calib_forward_s', 0.0):.1f} | {r.get('metric_mask_s', 0.0):.1f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
