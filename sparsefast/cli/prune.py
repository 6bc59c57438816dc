"""`sparsefast prune MODEL`: unstructured or N:M pruning with magnitude, Wanda, SparseGPT or RIA (optionally with
OWL's per-layer sparsity and DSnoT's mask refinement), then an atomic save.

Example (the README's quick start): prune SmolLM2-135M-Instruct with Wanda 2:4 and print WikiText-2 perplexity:
    sparsefast prune smollm2 --method wanda --pattern 2:4 --nsamples 32 --seqlen 512 --eval wikitext2
70% unstructured with OWL's layer-wise sparsity, the masks refined by DSnoT:
    sparsefast prune smollm2 --sparsity 0.7 --sparsity-allocation owl --refine dsnot --eval wikitext2
"""

from __future__ import annotations

import argparse

# both import no torch (sparsefast.config imports it when a config is made), so `sparsefast --help` stays light
from sparsefast.config.prune import (
    ALLOCATIONS,
    DSNOT_SCOPES,
    FROM_DISK_CHOICES,
    MAGNITUDE_SCOPES,
    METHODS,
    QUANTIZE_CHOICES,
    REFINERS,
    MagnitudeConfig,
    PruneConfig,
    RIAConfig,
    SparseGPTConfig,
    make_config,
)
from sparsefast.device import DTYPE_CHOICES


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = PruneConfig  # the defaults: a dataclass keeps each field's default as a class attribute
    p = subparsers.add_parser("prune", help="prune a model (magnitude | wanda | sparsegpt | ria) and save it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir, hub id, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)} (default wanda)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction pruned per linear in [0, 1); default 0.5; implied by N:M patterns")
    p.add_argument("--pattern", default=d.pattern, help=f"unstructured or N:M, e.g. 2:4, 4:8 (default {d.pattern})")
    p.add_argument("--calib", default=d.calib,
                   help=f"calibration text: c4, wikitext2 or a local .txt/.jsonl (default {d.calib})")
    p.add_argument("--nsamples", type=int, default=d.nsamples, help=f"calibration samples (default {d.nsamples})")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"tokens per calibration sample (default {d.seqlen})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"calibration sampling seed (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"calibration samples per layer forward (default {d.batch_size})")
    p.add_argument("--device", default=d.device, help=f"compute device: auto, cpu or cuda (default {d.device})")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPE_CHOICES,
                   help="model dtype (default auto: the checkpoint's; half types become float32 on CPU)")
    p.add_argument("--backend", default=d.backend,
                   help=f"sparsefast.ops backend: auto, torch, triton, cuda (default {d.backend})")
    p.add_argument("--scope", default=None, choices=MAGNITUDE_SCOPES,
                   help=f"magnitude and ria: one threshold per linear (layer) or per output row (default "
                        f"{MagnitudeConfig.scope} for magnitude, {RIAConfig.scope} for ria)")
    p.add_argument("--alpha", type=float, default=RIAConfig.alpha,
                   help=f"ria only: exponent of the activation norm (default {RIAConfig.alpha})")
    p.add_argument("--no-reallocation", action="store_true",
                   help="ria with N:M only: skip the channel reallocation of the MLP's down projection")
    p.add_argument("--sparsity-allocation", default=d.allocation, choices=ALLOCATIONS,
                   help="uniform: every layer at --sparsity; owl: per-layer sparsity from each layer's outlier "
                        "ratio, mean = --sparsity (unstructured only; adds one calibration pass)")
    p.add_argument("--owl-m", type=float, default=d.owl_m,
                   help=f"owl: an outlier scores above M x the layer's mean Wanda score (default {d.owl_m:g})")
    p.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                   help=f"owl: the layer sparsities lie within --sparsity +- 2 lambda (default {d.owl_lambda:g})")
    p.add_argument("--refine", default=None, choices=REFINERS,
                   help="refine every mask: dsnot (prune-and-grow swaps per row that shrink the expected "
                        "reconstruction error; no training)")
    p.add_argument("--dsnot-cycles", type=int, default=d.dsnot_cycles,
                   help=f"dsnot: at most this many swaps per row (default {d.dsnot_cycles})")
    p.add_argument("--dsnot-threshold", type=float, default=d.dsnot_threshold,
                   help=f"dsnot: a row stops once |expected error| <= this (default {d.dsnot_threshold:g})")
    p.add_argument("--dsnot-var-power", type=float, default=d.dsnot_var_power,
                   help=f"dsnot: growth candidates ranked by |W E[x]| / Var(x)^this (default {d.dsnot_var_power:g})")
    p.add_argument("--dsnot-scope", default=d.dsnot_scope, choices=DSNOT_SCOPES,
                   help=f"dsnot: refine the attention projections only (the paper's code) or all linears (default "
                        f"{d.dsnot_scope})")
    p.add_argument("--quantize", default=None, choices=QUANTIZE_CHOICES,
                   help="also quantize the kept weights: int8 (per output row, symmetric; sparsegpt quantizes "
                        "inside its sweep so the updates compensate the rounding, other methods round after the "
                        "mask; the LM head, and a tied embedding with it, is rounded too). The checkpoint keeps "
                        "scale x q in the weights and a weight_scale tensor per linear")
    p.add_argument("--blocksize", type=int, default=SparseGPTConfig.blocksize,
                   help=f"sparsegpt only: OBS block size (default {SparseGPTConfig.blocksize})")
    p.add_argument("--percdamp", type=float, default=SparseGPTConfig.percdamp,
                   help=f"sparsegpt only: damping fraction (default {SparseGPTConfig.percdamp})")
    p.add_argument("--data-dir", default=None, help="directory with datasets (else $SPARSEFAST_DATA, bundled)")
    p.add_argument("--out", default=None, help="output directory for the pruned HF checkpoint (omit: no save)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that sparsefast wrote (only the files it recorded) and an "
                        "existing --json file")
    p.add_argument("--eval", default="", help="comma list of wikitext2, ptb, c4: perplexity before and after")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default: --seqlen)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate only the first N perplexity windows (quick estimate; default: the full test set)")
    p.add_argument("--from-disk", default="auto", choices=FROM_DISK_CHOICES,
                   help="on: read the decoder layers one at a time from the checkpoint's safetensors and write each "
                        "pruned layer to --out as it finishes (peak memory about one layer plus the calibration "
                        "activations; the same result as loading it whole); off: load the model whole; auto "
                        "(default): on when the weights would take more than half the available memory and neither "
                        "--eval nor --quantize is given")
    p.add_argument("--json", default=None, help="also write the report to this file (refused if it exists, unless "
                   "--overwrite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The PruneConfig subclass of the parsed arguments, validated once here where it is made (method-specific
    options only where they apply); everything downstream trusts it."""
    kwargs = dict(sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen,
                  seed=args.seed, calib=args.calib, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                  backend=args.backend, allocation=args.sparsity_allocation, owl_m=args.owl_m,
                  owl_lambda=args.owl_lambda, refine=args.refine, dsnot_cycles=args.dsnot_cycles,
                  dsnot_threshold=args.dsnot_threshold, dsnot_var_power=args.dsnot_var_power,
                  dsnot_scope=args.dsnot_scope, quantize=args.quantize)
    if args.method in ("magnitude", "ria") and args.scope is not None:
        kwargs["scope"] = args.scope
    if args.method == "ria":
        kwargs.update(alpha=args.alpha, reallocation=not args.no_reallocation)
    elif args.method == "sparsegpt":
        kwargs.update(blocksize=args.blocksize, percdamp=args.percdamp)
    return make_config(args.method, **kwargs)


def run(args: argparse.Namespace) -> int:
    from sparsefast.api import prune_pretrained
    from sparsefast.checkpoint import check_output_file, write_json

    config = config_from_args(args)
    datasets = [d.strip() for d in args.eval.split(",") if d.strip()]
    if args.out is None and args.json is None and not datasets:
        raise ValueError("nothing to do with the pruned model: give --out DIR, --eval DATASETS or --json FILE")
    if args.json is not None:
        check_output_file(args.json, overwrite=args.overwrite)
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    if args.no_progress:
        transformers.utils.logging.disable_progress_bar()  # loading / saving bars (also huggingface_hub's)
    try:
        report = prune_pretrained(args.model, config, out=args.out, overwrite=args.overwrite, data_dir=args.data_dir,
                                  eval_datasets=datasets, eval_seqlen=args.eval_seqlen,
                                  eval_windows=args.eval_windows, progress=not args.no_progress,
                                  from_disk=args.from_disk)
    finally:
        if bars:  # restored for the rest of the process (main() may be called again in-process)
            transformers.utils.logging.enable_progress_bar()
    if args.json is not None:
        write_json(args.json, report, overwrite=args.overwrite)
    return 0
