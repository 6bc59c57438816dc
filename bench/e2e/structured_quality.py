"""LLM-Pruner results on SmolLM2-135M-Instruct: 20% block-wise structural pruning per importance, measured
without and with LoRA recovery.

Per row (dense first, then each importance without and with LoRA): WikiText-2 and PTB perplexity under the "gptq"
protocol (seqlen --gptq-seqlen, default 512) and the "llm-pruner" protocol (seqlen 128), zero-shot acc and acc_norm of
the 7 tasks (built-in lm-eval-format scorer on ../shared/data), parameters, MACs per token, and decode latency (batch 1,
128-token prompt, 64 new tokens) on the CPU it runs on, plus on the GPU with --device cuda. All importances share one
set of calibration ids (C4, seed 0, --nsamples × --seqlen, LLM-Pruner's 10 × 128 by default).

    python bench/e2e/structured_quality.py --data-dir ../shared/data                                # the full protocol
    python bench/e2e/structured_quality.py --data-dir ../shared/data --gptq-windows 80 \\
        --llm-pruner-windows 320 --zeroshot-limit 200 --lora-records 400 --lora-epochs 1 \\
        --lora-lr 1e-3 --lora-batch-size 4 --lora-grad-accum 1                                      # a CPU budget

The CPU budget evaluates a fixed prefix of each test set: the first 80 windows of 512 tokens (gptq protocol) and
the first 320 windows of 128 tokens (llm-pruner protocol), 40,960 tokens each.

The JSON (bench/results/<date>-<device>-smollm2-structured.json) is rewritten after every row; `--resume` keeps
the rows already there when the settings match, so a long CPU run can be continued.

Each row's own CPU decode latency is measured alone, on whatever machine and load that row ran with. The table's
speed column comes from `--decode-side-by-side` instead: dense and the pruned architecture timed in one run,
alternating (every importance prunes the same number of heads and channels per layer at a given ratio, so all pruned
rows share one architecture and, LoRA merged, one cost per token; the pass prunes with `random`, which needs no
gradients, and checks the parameter count against the rows'):

    python bench/e2e/structured_quality.py --out bench/results/....json --decode-side-by-side

`--uniform` measures rows pruned with `prune-structured --uniform` (every layer alike, a plain Llama checkpoint) into
the same JSON (with `--resume` and the same flags); their speed column is their own decode measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sparsefast.bench.results import commit_of, result_path, run_metadata

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def measure(model, tok, args) -> dict:
    """Perplexities, zero-shot, size and decode latency of `model` (every number the README table needs)."""
    from sparsefast.api import evaluate
    from sparsefast.eval.latency import decode_latency
    from sparsefast.eval.zeroshot import evaluate_zeroshot
    from sparsefast.prune.structural import count_parameters, macs_per_token

    row: dict = {"parameters": count_parameters(model), "macs_per_token": macs_per_token(model)["total"]}
    t = time.perf_counter()
    for protocol, seqlen, windows in (("gptq", args.gptq_seqlen, args.gptq_windows),
                                      ("llm-pruner", 128, args.llm_pruner_windows)):
        res = evaluate(model, tok, ["wikitext2", "ptb"], seqlen=seqlen, protocol=protocol, data_dir=args.data_dir,
                       device=args.device, max_windows=windows, progress=False)
        row[f"ppl_{protocol}"] = {k: float(v) for k, v in res.items()}
    row["ppl_s"] = time.perf_counter() - t
    zs = evaluate_zeroshot(model, tok, TASKS, limit=args.zeroshot_limit, data_dir=args.data_dir, device=args.device,
                           backend="builtin", progress=False)
    row["zeroshot"] = {"average": zs["average"], "tasks": zs["tasks"], "seconds": zs["seconds"]}
    if args.device != "cpu":
        row["decode_latency_gpu"] = decode_latency(model, device=args.device)
    model.to("cpu")
    row["decode_latency_cpu"] = decode_latency(model, device="cpu")  # always: the issue asks for CPU latency
    return row


def summary(row: dict) -> str:
    g, lp, zs = row["ppl_gptq"], row["ppl_llm-pruner"], row["zeroshot"]["average"]
    return (f"params {row['parameters']:,}, wikitext2 {g['wikitext2']:.2f}/{lp['wikitext2']:.2f}, ptb {g['ptb']:.2f}/"
            f"{lp['ptb']:.2f} (gptq/llm-pruner), zero-shot acc {zs['acc']:.4f} acc_norm {zs['acc_norm']:.4f}, "
            f"CPU decode {row['decode_latency_cpu']['decode_ms_per_token']:.1f} ms/token")


def decode_side_by_side(out: Path, repeats: int) -> int:
    """Batch-1 CPU decode of dense and of the pruned architecture, alternating for `repeats` rounds in this process;
    medians written to `out` as "decode_side_by_side"."""
    import statistics

    from sparsefast.checkpoint import write_json
    from sparsefast.eval.latency import decode_latency
    from sparsefast.models import load_model
    from sparsefast.prune.structural import StructuralConfig, count_parameters, prune_structured

    result = json.loads(out.read_text())
    s = result["settings"]
    pruned_params = {r["parameters"] for r in result["rows"] if r["importance"] != "dense" and not r.get("uniform")}
    dense, tok = load_model(s["model"], device="cpu")
    pruned, _ = load_model(s["model"], device="cpu")
    cfg = StructuralConfig(ratio=s["ratio"], importance="random", aggregation=s["aggregation"], layers=s["layers"],
                           seed=0)
    prune_structured(pruned, tok, cfg, None)
    if {count_parameters(pruned)} != pruned_params:
        raise SystemExit(f"the pruned architecture has {count_parameters(pruned):,} parameters, the rows "
                         f"{sorted(pruned_params)}: not the table's architecture")
    models = {"dense": dense, "pruned": pruned}
    runs: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        for name, model in (models.items() if r % 2 == 0 else reversed(models.items())):
            lat = decode_latency(model, repeats=1, warmup=1 if r == 0 else 0)
            runs[name].append(lat["decode_ms_per_token"])
    ms = {k: statistics.median(v) for k, v in runs.items()}
    result["decode_side_by_side"] = {
        "what": "batch-1 CPU decode (sparsefast.eval.latency.decode_latency: 128-token prompt, 64 new tokens), dense "
                "and the pruned architecture alternating in one run; medians",
        "metadata": run_metadata("cpu"), "torch_threads": torch.get_num_threads(),
        "pruned_parameters": count_parameters(pruned), "rounds": repeats,
        "dense_ms_per_token": ms["dense"], "pruned_ms_per_token": ms["pruned"],
        "runs_dense_ms_per_token": runs["dense"], "runs_pruned_ms_per_token": runs["pruned"],
        "speedup": ms["dense"] / ms["pruned"]}
    write_json(out, result)
    print(f"CPU decode: dense {ms['dense']:.1f} ms/token, pruned {ms['pruned']:.1f} ms/token "
          f"({ms['dense'] / ms['pruned']:.2f}x); wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from sparsefast.checkpoint import write_json
    from sparsefast.data import get_calibration
    from sparsefast.models import load_model
    from sparsefast.prune.structural import StructuralConfig, prune_structured
    from sparsefast.recover import RecoverConfig, load_recovery_data, lora_recover, tokenize_recovery_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--importances", default="random,l2,vector,element1,element2")
    p.add_argument("--aggregation", default="sum")
    p.add_argument("--layers", default=None, help="decoder layers START-END (default: all but the first and last)")
    p.add_argument("--nsamples", type=int, default=10, help="calibration samples for the Taylor importances")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--gptq-seqlen", type=int, default=512)
    p.add_argument("--gptq-windows", type=int, default=None,
                   help="gptq protocol: first N windows only (default: the full test sets)")
    p.add_argument("--llm-pruner-windows", type=int, default=None,
                   help="llm-pruner protocol: first N windows only (default: the full test sets)")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="first N items per task (default: all)")
    p.add_argument("--lora-records", type=int, default=None, help="Alpaca records for LoRA (default: all 2000)")
    p.add_argument("--lora-epochs", type=int, default=2)
    p.add_argument("--lora-lr", type=float, default=RecoverConfig.lr)
    p.add_argument("--lora-batch-size", type=int, default=RecoverConfig.batch_size)
    p.add_argument("--lora-grad-accum", type=int, default=RecoverConfig.grad_accum)
    p.add_argument("--lora-importances", default="element1,element2,l2",
                   help="importances that also get a LoRA-recovered row (default: %(default)s)")
    p.add_argument("--no-lora", action="store_true")
    p.add_argument("--uniform", action="store_true",
                   help="prune every layer alike (prune-structured --uniform, no --layers): rows marked uniform, kept "
                        "beside the layer-wise rows of the same --out (--resume)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true", help="keep the rows already measured in --out")
    p.add_argument("--decode-side-by-side", action="store_true",
                   help="only time CPU decode of dense vs the pruned architecture in one run and add it to --out")
    p.add_argument("--decode-repeats", type=int, default=5, help="alternating rounds of --decode-side-by-side")
    args = p.parse_args(argv)
    if args.decode_side_by_side:
        if not args.out or not Path(args.out).is_file():
            p.error("--decode-side-by-side needs --out, an existing results JSON of this script")
        return decode_side_by_side(Path(args.out), args.decode_repeats)
    importances = args.importances.split(",")
    lora_importances = [] if args.no_lora else args.lora_importances.split(",")
    if not set(lora_importances) <= set(importances):
        p.error(f"--lora-importances {args.lora_importances} must be among --importances {args.importances}")
    lora_cfg = RecoverConfig(epochs=args.lora_epochs, max_samples=args.lora_records, lr=args.lora_lr,
                             batch_size=args.lora_batch_size, grad_accum=args.lora_grad_accum)
    for imp in importances:  # every name checked (on construction) before the first measurement
        StructuralConfig(ratio=args.ratio, importance=imp, aggregation=args.aggregation, nsamples=args.nsamples,
                         seqlen=args.seqlen, layers=args.layers, uniform=args.uniform)
    out = Path(args.out) if args.out else result_path(f"{Path(args.model).name}-structured", device=args.device)
    settings = {"model": args.model, "ratio": args.ratio, "strategy": "block", "aggregation": args.aggregation,
                "layers": args.layers,
                "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
                "ppl": {"gptq_seqlen": args.gptq_seqlen, "gptq_windows": args.gptq_windows, "llm_pruner_seqlen": 128,
                        "llm_pruner_windows": args.llm_pruner_windows},
                "zeroshot": {"tasks": TASKS, "limit": args.zeroshot_limit, "backend": "builtin",
                             "metrics": "acc, acc_norm (lm-eval's: by characters; acc where lm-eval defines no "
                                        "acc_norm: boolq, winogrande), acc_bytes"},
                "lora": None if args.no_lora else {**asdict(lora_cfg), "target_modules": list(lora_cfg.target_modules),
                                                   "data": "alpaca", "importances": lora_importances},
                "device": args.device}
    from sparsefast.api import versions

    result = {"what": "LLM-Pruner block-wise structural pruning of SmolLM2-135M-Instruct, without and with LoRA",
              "settings": settings, "metadata": run_metadata(args.device), "versions": versions(),
              "command": " ".join([sys.executable, *sys.argv]), "rows": []}
    if args.device != "cpu" and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        if {**previous["settings"], "lora": None} != {**settings, "lora": None}:
            p.error(f"--resume: {out} was measured with other settings; use another --out or the same flags")
        def lora_recipe(lora: dict | None) -> dict | None:  # what a LoRA row depends on (not which rows have one)
            return None if lora is None else {k: v for k, v in lora.items() if k != "importances"}

        same_lora = lora_recipe(previous["settings"]["lora"]) == lora_recipe(settings["lora"])
        if same_lora and settings["lora"] is not None:
            settings["lora"]["importances"] = sorted({*previous["settings"]["lora"]["importances"],
                                                      *lora_importances})
        if not same_lora:  # the rows without LoRA do not depend on the LoRA settings: keep those, redo the rest
            print(f"--resume: other LoRA settings than {out}; its LoRA rows are measured again", flush=True)
        result["rows"] = [r for r in previous["rows"] if same_lora or not r["lora"]]
        if "decode_side_by_side" in previous:  # the layer-wise architecture's speed does not change with new rows
            result["decode_side_by_side"] = previous["decode_side_by_side"]
        result["resumed_from_commits"] = [*previous.get("resumed_from_commits", []), commit_of(previous)]
    done = {(r["importance"], r["lora"]) for r in result["rows"] if r.get("uniform", False) == args.uniform}
    if any(r["importance"] == "dense" for r in result["rows"]):
        done.add(("dense", False))  # the dense row does not depend on --uniform
    samples = None
    if not args.no_lora:
        records = load_recovery_data("alpaca", data_dir=args.data_dir, max_samples=args.lora_records)

    def record(row: dict) -> None:
        result["rows"].append(row)
        write_json(out, result)
        print(f"{row['importance']}{' + LoRA' if row['lora'] else ''}: {summary(row)}", flush=True)

    model, tok = load_model(args.model, device="cpu")
    calib = get_calibration("c4", tok, args.nsamples, args.seqlen, seed=0, data_dir=args.data_dir)
    if ("dense", False) not in done:
        record({"importance": "dense", "lora": False, **measure(model, tok, args)})
    for imp in importances:
        with_lora = imp in lora_importances
        if (imp, False) in done and (not with_lora or (imp, True) in done):
            continue
        model, tok = load_model(args.model, device="cpu")
        cfg = StructuralConfig(ratio=args.ratio, importance=imp, aggregation=args.aggregation, nsamples=args.nsamples,
                               seqlen=args.seqlen, layers=args.layers, seed=0, uniform=args.uniform)
        model.to(args.device)
        rep = prune_structured(model, tok, cfg, calib)
        model.to("cpu")
        pruning = {"seconds": rep["seconds"], "removed": rep["removed"], "parameter_ratio": rep["parameter_ratio"],
                   "importance_stats": rep["importance"]}
        if (imp, False) not in done:
            record({"importance": imp, "lora": False, "uniform": args.uniform, "pruning": pruning,
                    **measure(model, tok, args)})
        if not with_lora:
            continue
        if samples is None:
            samples, dropped = tokenize_recovery_data(records, tok, lora_cfg.cutoff_len)
        # under an accelerate Accelerator, as `sparsefast recover` trains (one process here)
        model, stats = lora_recover(model, tok, samples, lora_cfg, device=args.device, progress=False,
                                    accelerator=Accelerator(cpu=args.device == "cpu"))
        model.to("cpu")
        stats = {**{k: v for k, v in stats.items() if k != "config"}, "records": len(records.records),
                 "dropped_too_long": dropped, "data": records.source}
        record({"importance": imp, "lora": True, "uniform": args.uniform, "pruning": pruning, "recovery": stats,
                **measure(model, tok, args)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
