"""Decode speed of the generation engine in gpt-fast's units, side by side in one run: dense, structural 20%
(block-wise; a checkpoint from `sparsefast prune-structured`, or pruned in memory) and 2:4 (magnitude, in memory;
swapped by `sparsefast.nn.sparsify_` in mode "auto": Sparse24Linear on CUDA, the measured SparseLinear swap on CPU),
with `model.generate` and transformers' continuous batching (`generate_batch`, paged cache) on the same models as
the peers. The measurements and their definitions are sparsefast.bench.decode's.

Per variant and repeat (variants interleaved, so slow phases of a shared machine hit all of them): engine batch 1
(end to end, decode-only, steady state from the median inter-token latency, TTFT); `model.generate` batch 1 (dense;
every variant with --generate-all); engine with C concurrent requests; once per variant, on CPU, not with
--dry-run: transformers continuous batching at batch 1 and C (tokens/s, or the error it raised). Weight bytes per
token next to tokens/s, against the copy and read bandwidth measured in the same run
(sparsefast.bench.memory.memory_bandwidth). Prompts are random token ids.

Usage (CPU, SmolLM2; make the structural checkpoint first, it is not timed; run on a quiet machine):
    sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --data-dir ../shared/data --out /tmp/s20
    python bench/e2e/bench_decode.py --model smollm2 --structural /tmp/s20
GPU (bench/gpu/run.sh): --model llama-7b-random --device cuda (structural pruned in memory with l2 importance).
Dry run: --model llama-tiny-random --dry-run (a few tokens, writes under /tmp unless --out is given).
Writes <date>-<device>-decode-<model>.json to --out (default bench/results/); committed runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from sparsefast.bench.decode import (
    IdTokenizer,
    engine_batch1,
    engine_concurrent,
    generate_batch1,
    transformers_cb,
    weight_bytes_per_token,
)
from sparsefast.bench.memory import memory_bandwidth
from sparsefast.bench.results import result_path, run_metadata
from sparsefast.bench.shapes import FULL_LAYERS, RANDOM_MODELS, build_model
from sparsefast.checkpoint import check_output_file, write_json
from sparsefast.nn import sparsify_, swapped_layer_names
from sparsefast.serve.engine import GenerationEngine

VARIANTS = ("dense", "structural", "sparse24")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a checkpoint, llama-7b-random, "
                                                      "llama-tiny-random")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a *-random model (default: all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--structural", default=None, help="structural checkpoint of the same model (default: prune "
                                                      "20%% block-wise in memory with --struct-importance)")
    p.add_argument("--struct-importance", default="l2", help="importance when pruning in memory (default l2: no "
                                                             "calibration data; the speed does not depend on it)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-generate", action="store_true", help="skip the model.generate baseline")
    p.add_argument("--generate-all", action="store_true",
                   help="model.generate on every variant (default: dense only; it is the slow part of a CPU run)")
    p.add_argument("--no-cb", action="store_true", help="skip transformers continuous batching")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="result directory (default bench/results; /tmp with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the harness, timings mean nothing")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "dense" not in args.variants:
        raise SystemExit(f"bench_decode: --variants must include dense and only {', '.join(VARIANTS)}; got {bad}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_decode: --device cuda but CUDA is not available")
    for name in ("prompt_len", "new_tokens", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench_decode: --{name.replace('_', '-')} must be >= 1")
    if args.dry_run:  # continuous batching is skipped: its manager set-up alone outlasts the rest of a CPU dry run
        args.new_tokens, args.repeats, args.prompt_len = min(args.new_tokens, 6), 1, min(args.prompt_len, 8)
        args.concurrency, args.no_cb = min(args.concurrency, 3), True
    return args


def load_variants(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """{variant: model}, tokenizer, {variant: how it was made}."""
    from sparsefast.api import load, prune
    from sparsefast.config import MagnitudeConfig

    random = args.model in RANDOM_MODELS

    def fresh():
        if random:
            layers = args.layers or FULL_LAYERS.get(args.model, 4)
            return build_model(args.model, layers, device)[0], IdTokenizer()
        return load(args.model, device=device)

    models, notes = {}, {}
    models["dense"], tok = fresh()
    notes["dense"] = f"{args.model} as loaded ({next(models['dense'].parameters()).dtype})"
    if "structural" in args.variants:
        if args.structural:
            models["structural"], _ = load(args.structural, device=device)
            notes["structural"] = f"checkpoint {args.structural}"
        else:
            from sparsefast.prune.structural import StructuralConfig, prune_structured

            model, _ = fresh()
            cfg = StructuralConfig(ratio=0.2, importance=args.struct_importance, strategy="block")
            prune_structured(model, tok if not random else None, cfg, calib=_random_calib(model, cfg))
            models["structural"] = model.eval()
            notes["structural"] = f"in memory: 20% block-wise, {args.struct_importance}, default layer range"
    if "sparse24" in args.variants:
        model, _ = fresh()
        prune(model, MagnitudeConfig(pattern="2:4", device=device.type), progress=False)
        swapped = swapped_layer_names(sparsify_(model))  # mode "auto"
        models["sparse24"] = model
        kind = "Sparse24Linear" if device.type == "cuda" else "SparseLinear (measured CPU swap)"
        notes["sparse24"] = ("magnitude 2:4; " + (f"{len(swapped)} linears as {kind}" if swapped else
                                                  "dense-with-zeros (no linear swapped)"))
    return models, tok, notes


def _random_calib(model, cfg) -> torch.Tensor | None:
    """Gradient importances on a random model get random ids (no text); l2/random need none."""
    if not cfg.needs_gradients:
        return None
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (cfg.nsamples, cfg.seqlen), generator=gen).to(model.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = args.out or ("/tmp" if args.dry_run else None)
    out_path = result_path(f"decode-{Path(args.model).name}", device=args.device, out_dir=out_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_output_file(out_path)  # before any work: a result that cannot be written is a wasted run
    models, tok, notes = load_variants(args, device)
    vocab = models["dense"].get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.concurrency)]
    max_len = args.prompt_len + args.new_tokens + 1
    engines = {v: GenerationEngine(m, tok, max_batch=args.concurrency, max_model_len=max_len, device=args.device)
               for v, m in models.items()}
    for e in engines.values():
        e.start()
    raw: dict[str, dict[str, list]] = {v: {"engine_b1": [], "generate_b1": [], "engine_concurrent": []}
                                       for v in models}
    cb: dict[str, dict[str, Any]] = {}
    try:
        for v, e in engines.items():  # warm-up: first calls allocate and pick kernels
            engine_batch1(e, prompts[0], 2)
            engine_concurrent(e, prompts, 2)
        for rep in range(args.repeats):
            for v, e in engines.items():
                raw[v]["engine_b1"].append(engine_batch1(e, prompts[0], args.new_tokens))
                if not args.no_generate and (v == "dense" or args.generate_all):
                    raw[v]["generate_b1"].append(generate_batch1(models[v], prompts[0], args.new_tokens, device))
                raw[v]["engine_concurrent"].append(engine_concurrent(e, prompts, args.new_tokens))
                print(f"[{rep}] {v}: engine b1 {raw[v]['engine_b1'][-1]['tokens_per_s']:.2f} tok/s, "
                      f"c{args.concurrency} {raw[v]['engine_concurrent'][-1]['output_tokens_per_s']:.2f} tok/s",
                      flush=True)
        if not args.no_cb and args.device == "cpu":
            for v in ("dense", "structural"):
                if v in models:
                    cb[v] = {"batch1": transformers_cb(models[v], prompts[:1], args.new_tokens),
                             f"batch{args.concurrency}": transformers_cb(models[v], prompts, args.new_tokens)}
    finally:
        for e in engines.values():
            e.shutdown()
    bw = memory_bandwidth(device)
    result = summarize(args, models, notes, raw, cb, bw)
    path = write_json(out_path, result)
    for v, s in result["summary"].items():
        print(f"{v}: {s}")
    print(f"wrote {path}")
    return 0


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def summarize(args, models, notes, raw, cb, bw) -> dict[str, Any]:
    """Medians over repeats. Two views of the same runs: wall (tokens / elapsed time) and steady-state (1 / median
    inter-token latency, which drops the stalls a shared CPU adds to some steps)."""
    c = args.concurrency
    summary: dict[str, dict[str, Any]] = {}
    for v, m in models.items():
        bytes_tok = weight_bytes_per_token(m)
        b1 = _med(raw[v]["engine_b1"], "tokens_per_s")
        dec = _med(raw[v]["engine_b1"], "decode_tokens_per_s")
        itl = _med(raw[v]["engine_b1"], "median_itl_s")
        gen_tps = _med(raw[v]["generate_b1"], "tokens_per_s")
        gen_itl = _med(raw[v]["generate_b1"], "median_itl_s")
        conc = _med(raw[v]["engine_concurrent"], "output_tokens_per_s")
        conc_itl = _med(raw[v]["engine_concurrent"], "median_itl_s")
        steady = 1 / itl
        summary[v] = {
            "weight_bytes_per_token": bytes_tok,
            "engine_b1_tokens_per_s": b1, "engine_b1_decode_tokens_per_s": dec,
            "engine_b1_steady_tokens_per_s": steady,
            "weight_gbs_decode": bytes_tok * dec / 1e9, "weight_gbs_steady": bytes_tok * steady / 1e9,
            "fraction_of_copy_bw_steady": bytes_tok * steady / 1e9 / bw["copy_gbs"],
            "fraction_of_read_bw_steady": bytes_tok * steady / 1e9 / bw["read_gbs"],
            "generate_b1_tokens_per_s": gen_tps,
            "generate_b1_steady_tokens_per_s": 1 / gen_itl if gen_itl else None,
            "engine_vs_generate": b1 / gen_tps if gen_tps else None,
            "engine_vs_generate_steady": steady * gen_itl if gen_itl else None,
            f"engine_c{c}_tokens_per_s": conc, f"engine_c{c}_steady_tokens_per_s": c / conc_itl,
            f"c{c}_vs_b1": conc / b1, f"c{c}_vs_b1_steady": c / conc_itl / steady,
        }
    dense = summary["dense"]
    for v, s in summary.items():
        s["b1_decode_vs_dense"] = s["engine_b1_decode_tokens_per_s"] / dense["engine_b1_decode_tokens_per_s"]
        s["b1_steady_vs_dense"] = s["engine_b1_steady_tokens_per_s"] / dense["engine_b1_steady_tokens_per_s"]
        s["bytes_vs_dense"] = s["weight_bytes_per_token"] / dense["weight_bytes_per_token"]
    return {"what": "decode", "metadata": run_metadata(args.device), "torch_threads": torch.get_num_threads(),
            "args": {k: v for k, v in vars(args).items()}, "variants": notes, "memory_bandwidth": bw,
            "summary": summary, "transformers_continuous_batching": cb, "raw": raw}


if __name__ == "__main__":
    sys.exit(main())
