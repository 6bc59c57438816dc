"""`sparsefast prune-structured MODEL`: LLM-Pruner structural pruning (heads, MLP channels, hidden channels or whole
layers are removed physically), then an atomic save without pickle (safetensors + structure.json + sparsefast.json).

Example: 20% block-wise with element-wise first-order Taylor importance on 10 C4 samples, layers 3-27:
    sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --strategy block --layers 3-27 \\
        --calib c4 --nsamples 10 --seqlen 128 --out pruned/ --overwrite

LLM-Pruner's published configuration in one flag (options given explicitly still win):
    sparsefast prune-structured smollm2 --preset llm-pruner --ratio 0.25 --out pruned/
"""

from __future__ import annotations

import argparse

# these import no torch, so `sparsefast --help` stays light
from sparsefast.config.prune import FROM_DISK_CHOICES
from sparsefast.config.structural import (
    AGGREGATIONS,
    GQA_MODES,
    IMPORTANCES,
    PRESETS,
    RANKINGS,
    ROUNDINGS,
    STRATEGIES,
    StructuralConfig,
)
from sparsefast.device import DTYPE_CHOICES

# options a preset may set: parsed with default None so an explicit value can be told from an absent one
_PRESETTABLE = ("importance", "aggregation", "strategy", "layers", "attn_layers", "mlp_layers", "ranking", "gqa",
                "rounding", "nsamples", "seqlen", "seed")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = StructuralConfig  # the defaults: a dataclass keeps each field's default as a class attribute
    p = subparsers.add_parser("prune-structured", help="structural pruning (LLM-Pruner): smaller dense model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir, hub id, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help=f"start from a published configuration: {_describe_presets()}; options given explicitly "
                        "still win and --ratio is still yours (LLM-Pruner's ~20%%-of-parameters LLaMA-7B run used "
                        "0.25)")
    p.add_argument("--ratio", type=float, default=d.ratio, help=f"fraction of units removed, in [0, 1) "
                   f"(default {d.ratio})")
    p.add_argument("--importance", default=None, choices=IMPORTANCES,
                   help=f"group importance (default {d.importance})")
    p.add_argument("--aggregation", default=None, choices=AGGREGATIONS,
                   help=f"within-group aggregation (default {d.aggregation})")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help=f"block: heads + MLP channels; channel: hidden size; layer: whole layers (default "
                        f"{d.strategy})")
    p.add_argument("--layers", default=None,
                   help="decoder layers START-END inclusive, or START-END@DEPTH (a range of a DEPTH-layer model "
                        "scaled to this one); block: sets both --attn-layers and --mlp-layers "
                        "(default: all but the first and the last)")
    p.add_argument("--attn-layers", default=None, help="block: layers whose attention heads are pruned (default "
                   "--layers)")
    p.add_argument("--mlp-layers", default=None, help="block: layers whose MLP channels are pruned (default --layers)")
    p.add_argument("--ranking", default=None, choices=RANKINGS,
                   help=f"per-layer (local) or global ranking (default {d.ranking})")
    p.add_argument("--gqa", default=None, choices=GQA_MODES,
                   help=f"divisible: drop query heads evenly per KV group; kv_groups: drop whole KV groups (default "
                        f"{d.gqa})")
    p.add_argument("--rounding", default=None, choices=ROUNDINGS,
                   help=f"units removed: half_up = round(ratio*n) half up; keep_floor = LLM-Pruner's (keep "
                        f"int((1-ratio)*channels), remove the rest in whole heads) (default {d.rounding})")
    p.add_argument("--uniform", action="store_true",
                   help="block strategy: prune every layer (first and last included) alike, so the output is a plain "
                        "LlamaForCausalLM-family checkpoint that vLLM, llama.cpp and transformers load as is")
    p.add_argument("--no-attention", action="store_true", help="block strategy: keep every attention head")
    p.add_argument("--no-mlp", action="store_true", help="block strategy: keep every MLP channel")
    p.add_argument("--calib", default="c4", help="calibration text: c4 (default), wikitext2 or a local file")
    p.add_argument("--nsamples", type=int, default=None, help=f"calibration samples (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, default=None, help=f"tokens per calibration sample (default {d.seqlen}; "
                   "at most the model's context)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"calibration / random-importance seed (default {d.seed})")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing for gradients")
    p.add_argument("--device", default="auto", help="compute device: auto (default), cpu or cuda")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="model dtype (default: the checkpoint's; half types become float32 on CPU)")
    p.add_argument("--data-dir", default=None, help="directory with datasets (else $SPARSEFAST_DATA, bundled)")
    p.add_argument("--out", required=True, help="output directory of the pruned checkpoint")
    p.add_argument("--from-disk", default="auto", choices=FROM_DISK_CHOICES,
                   help="on: keep the decoder layers on disk, reading one at a time from the checkpoint's "
                        "safetensors for the gradients and again to slice and write it to --out (peak memory about "
                        "one layer, its gradients and the calibration activations; the same checkpoint as loading "
                        "it whole; block strategy, on the CPU); off: load the model whole; auto (default): on when "
                        "the weights would take more than half the available memory and the run allows it")
    p.add_argument("--json", default=None, help="also write the full report to this file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that sparsefast wrote (only the files it recorded) and an "
                        "existing --json file")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (loading, calibration, importance, pruning, saving)")
    p.set_defaults(func=run)
    return p


def _describe_presets() -> str:
    """Every preset's settings, for --help: 'llm-pruner = strategy block, importance element1, ...'."""
    return "; ".join(f"{name} = " + ", ".join(f"{field} {value}" for field, value in settings.items())
                     for name, settings in PRESETS.items())


def config_from_args(args: argparse.Namespace) -> StructuralConfig:
    """The config, validated once here where it is made: the preset (if any), then every option given explicitly."""
    explicit = {name: getattr(args, name) for name in _PRESETTABLE if getattr(args, name) is not None}
    explicit.update(ratio=args.ratio, prune_attention=not args.no_attention, prune_mlp=not args.no_mlp,
                    gradient_checkpointing=not args.no_checkpointing)
    if args.uniform:  # every layer is pruned: a preset's layer range gives way, an explicit one is an error
        explicit.update(uniform=True, layers=args.layers)
    return StructuralConfig.preset(args.preset, **explicit) if args.preset else StructuralConfig(**explicit)


def run(args: argparse.Namespace) -> int:
    import transformers

    from sparsefast.api import from_disk_plan, prune_structured_from_disk
    from sparsefast.checkpoint import OutputClaim, check_output_dir, check_output_file, write_json
    from sparsefast.data import check_data_dir
    from sparsefast.device import resolve_dtype
    from sparsefast.models import load_config, local_source_paths

    config = config_from_args(args)          # bad ratio / names / layer ranges: before loading anything
    sources = local_source_paths(args.model)
    check_output_dir(args.out, args.overwrite, sources=sources)
    if args.json is not None:
        check_output_file(args.json, overwrite=args.overwrite)
    check_data_dir(args.data_dir)
    hf_config = load_config(args.model)      # None for GGUF: prune_structured checks the context after loading
    if hf_config is not None:                # the same check from config.json, before any weight is read
        config.check_context(getattr(hf_config, "max_position_embeddings", None))
    plan = from_disk_plan(args.model, args.from_disk, dtype=resolve_dtype(args.dtype), log=print,
                          needs_whole=_needs_whole(config, args.device))
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()    # also huggingface_hub's bars
    claim = OutputClaim(args.out, args.overwrite, sources=sources)  # held until the save: a second run stops here
    try:
        if plan is not None:  # each layer is written as it is pruned
            report = prune_structured_from_disk(args.model, plan, config, claim, calib_source=args.calib,
                                                data_dir=args.data_dir, progress=not args.no_progress)
        else:
            report, save_s = _prune_loaded(args, config, claim)
    finally:
        claim.release()
        if bars:
            transformers.utils.logging.enable_progress_bar()
    print(summary(report))
    print(f"saved {claim.path} " + ("(pruned from disk)" if plan is not None else f"({save_s:.1f} s)"))
    if args.json is not None:
        print(f"report written to {write_json(args.json, report, overwrite=args.overwrite)}")
    return 0


def _prune_loaded(args: argparse.Namespace, config: StructuralConfig, claim) -> tuple[dict, float]:
    """Load the model whole, prune it and save it to the claimed output; returns (report, seconds of the save)."""
    import sys
    import time

    from sparsefast.checkpoint import check_savable, save_checkpoint
    from sparsefast.device import resolve_dtype
    from sparsefast.export.architecture import set_plain_config
    from sparsefast.models import load_model, save_structural
    from sparsefast.prune.structural import prune_structured

    model, tokenizer = load_model(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
    check_savable(model)
    report = prune_structured(model, tokenizer, config, calib_source=args.calib, data_dir=args.data_dir,
                              progress=not args.no_progress)
    report["model"] = args.model
    if not args.no_progress:
        print(f"prune-structured: saving {claim.path}", file=sys.stderr, flush=True)
    t_save = time.perf_counter()
    if config.uniform:  # every layer alike: a plain config any engine loads, no structure.json
        set_plain_config(model)
        save_checkpoint(model, tokenizer, claim, report)
    else:
        save_structural(model, claim, tokenizer=tokenizer, report=report)
    return report, time.perf_counter() - t_save


def _needs_whole(config: StructuralConfig, device: str) -> str | None:
    """Why this run needs the whole model in memory (so it cannot prune from disk), or None."""
    from sparsefast.api import compute_device
    from sparsefast.prune.structural import why_not_streamable

    if compute_device(device).type != "cpu":
        return "pruning from disk runs on the CPU: --device cpu, or --from-disk off"
    return why_not_streamable(config)


def summary(report: dict) -> str:
    """The human line of a prune_structured report: what was removed, parameters and MACs per token before and
    after, and the time of each phase."""
    config, before, after, sec = report["config"], report["before"], report["after"], report["seconds"]
    phases = ", ".join(f"{name} {sec[key]:.1f} s" for name, key in (("graph", "graph"), ("calibration", "calibration"),
                                                                    ("importance", "importance"),
                                                                    ("pruning", "slicing")))
    return (f"pruned {config['strategy']} ratio {config['ratio']:g} ({config['importance']} importance): parameters "
            f"{before['parameters']:,} -> {after['parameters']:,} ({after['parameters'] / before['parameters']:.1%}), "
            f"MACs per token {before['macs_per_token']['total']:,} -> {after['macs_per_token']['total']:,}, in "
            f"{sec['total']:.1f} s ({phases})")
