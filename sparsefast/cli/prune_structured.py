"""`sparsefast prune-structured MODEL`: LLM-Pruner structural pruning (heads, MLP channels, hidden channels or whole
layers are removed physically), then an atomic save without pickle (safetensors + structure.json + sparsefast.json).

Example: 20% block-wise with element-wise first-order Taylor importance on 10 C4 samples, layers 3-27:
    sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --strategy block --layers 3-27 \\
        --calib c4 --nsamples 10 --seqlen 128 --out pruned/ --overwrite
"""

from __future__ import annotations

import argparse

from sparsefast.device import DTYPE_CHOICES
from sparsefast.prune.structural.config import AGGREGATIONS, GQA_MODES, IMPORTANCES, RANKINGS, STRATEGIES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("prune-structured", help="structural pruning (LLM-Pruner): smaller dense model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir, hub id, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--ratio", type=float, default=0.2, help="fraction of units removed, in [0, 1) (default 0.2)")
    p.add_argument("--importance", default="element1", choices=IMPORTANCES, help="group importance (default element1)")
    p.add_argument("--aggregation", default="sum", choices=AGGREGATIONS, help="within-group aggregation (default sum)")
    p.add_argument("--strategy", default="block", choices=STRATEGIES,
                   help="block: heads + MLP channels; channel: hidden size; layer: whole layers (default block)")
    p.add_argument("--layers", default=None,
                   help="decoder layers START-END inclusive (default: all but the first and the last)")
    p.add_argument("--ranking", default="local", choices=RANKINGS, help="per-layer (local) or global ranking")
    p.add_argument("--gqa", default="divisible", choices=GQA_MODES,
                   help="divisible: drop query heads evenly per KV group (default); kv_groups: drop whole KV groups")
    p.add_argument("--no-attention", action="store_true", help="block strategy: keep every attention head")
    p.add_argument("--no-mlp", action="store_true", help="block strategy: keep every MLP channel")
    p.add_argument("--calib", default="c4", help="calibration text: c4 (default), wikitext2 or a local file")
    p.add_argument("--nsamples", type=int, default=10, help="calibration samples (default 10, LLM-Pruner's)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sample (default 128)")
    p.add_argument("--seed", type=int, default=0, help="calibration / random-importance seed (default 0)")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing for gradients")
    p.add_argument("--device", default="auto", help="compute device: auto (default), cpu or cuda")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="model dtype (default: the checkpoint's; half types become float32 on CPU)")
    p.add_argument("--data-dir", default=None, help="directory with datasets (else $SPARSEFAST_DATA, bundled)")
    p.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    from sparsefast.prune.structural.config import StructuralConfig

    cfg = StructuralConfig(ratio=args.ratio, importance=args.importance, aggregation=args.aggregation,
                           strategy=args.strategy, layers=args.layers, ranking=args.ranking, gqa=args.gqa,
                           prune_attention=not args.no_attention, prune_mlp=not args.no_mlp, nsamples=args.nsamples,
                           seqlen=args.seqlen, seed=args.seed, gradient_checkpointing=not args.no_checkpointing)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    import json

    from sparsefast.checkpoint import check_output_dir
    from sparsefast.device import resolve_dtype
    from sparsefast.models import load_model
    from sparsefast.prune.structural import prune_structured, save_structural

    config = config_from_args(args)          # bad ratio / names: before loading anything
    check_output_dir(args.out, args.overwrite)
    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
    report = prune_structured(model, tokenizer, config, calib_source=args.calib, data_dir=args.data_dir)
    report["model"] = args.model
    save_structural(model, args.out, tokenizer=tokenizer, report=report, overwrite=args.overwrite)
    before, after = report["before"], report["after"]
    print(json.dumps({"out": args.out, "parameters": [before["parameters"], after["parameters"]],
                      "macs_per_token": [before["macs_per_token"]["total"], after["macs_per_token"]["total"]],
                      "removed": report["removed"], "seconds": round(report["seconds"]["total"], 2)}))
    return 0
