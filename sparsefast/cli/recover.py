"""`sparsefast recover MODEL`: LoRA recovery of a pruned model on instruction data, merged and saved atomically.

Loss on the Alpaca response only; bf16 or fp32 compute (no fp16); a NaN/inf loss stops the run. Mask-pruned
models keep their exact zero pattern (masks re-applied after the merge); structural checkpoints are saved back
as structural checkpoints. Example (a quick CPU run):
    sparsefast recover pruned/ --data alpaca --out recovered/ --max-samples 64 --epochs 1 --dtype fp32
"""

from __future__ import annotations

import argparse
import json

# imports no torch, so `sparsefast --help` stays light
from sparsefast.config.recover import COMPUTE_DTYPES, RecoverConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = RecoverConfig  # the defaults: a dataclass keeps each field's default as a class attribute
    p = subparsers.add_parser("recover", help="LoRA-recover a pruned model, merge and save",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="pruned checkpoint dir (HF or structural), hub id, .gguf file, or 'smollm2'")
    p.add_argument("--data", default="alpaca",
                   help="'alpaca' (shared 2000 records) or a .json/.jsonl file of instruction/input/output "
                        "records, or .txt / 'text' records (default alpaca)")
    p.add_argument("--data-dir", default=None, help="directory with datasets (else $SPARSEFAST_DATA)")
    p.add_argument("--out", required=True, help="output directory for the recovered checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that sparsefast wrote (only the files it recorded) and an "
                        "existing --json file")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help=f"LoRA rank (default {d.lora_r})")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                   help=f"LoRA alpha; scale = alpha / r (default {d.lora_alpha})")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout,
                   help=f"dropout on the LoRA input (default {d.lora_dropout})")
    p.add_argument("--target-modules", default=",".join(d.target_modules),
                   help=f"comma list of linear names to adapt (default {','.join(d.target_modules)})")
    p.add_argument("--cutoff-len", type=int, default=d.cutoff_len,
                   help=f"max tokens per sample (default {d.cutoff_len})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr:g})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"samples per micro-batch (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"micro-batches per optimizer step (default {d.grad_accum})")
    p.add_argument("--max-samples", type=int, default=d.max_samples,
                   help="use only the first N records (default all)")
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help=f"fraction of steps of linear warm-up (default {d.warmup_ratio})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"LoRA init and shuffling seed (default {d.seed})")
    p.add_argument("--dtype", default=None, choices=COMPUTE_DTYPES,
                   help="compute and saved dtype (default: bf16 on a bf16-capable GPU, else fp32)")
    p.add_argument("--device", default="auto", help="compute device: auto (default), cpu or cuda")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--json", default=None, help="also write the report to this file (refused if it exists, unless "
                   "--overwrite)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _default_dtype(device: str) -> str:
    import torch

    from sparsefast.device import resolve_device

    dev = resolve_device(device)
    return "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def config_from_args(args: argparse.Namespace) -> RecoverConfig:
    """The RecoverConfig of the parsed flags, validated once here where it is made (ValueError naming the bad
    flag's field); recover_pretrained and the training loop trust it."""
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    return RecoverConfig(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=targets, cutoff_len=args.cutoff_len, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, max_samples=args.max_samples,
                         dtype=args.dtype or _default_dtype(args.device), warmup_ratio=args.warmup_ratio,
                         gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from sparsefast.checkpoint import check_output_file, write_json
    from sparsefast.recover import recover_pretrained

    config = config_from_args(args)
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite)
    report = recover_pretrained(args.model, args.data, args.out, config, data_dir=args.data_dir, device=args.device,
                                overwrite=args.overwrite, progress=not args.no_progress)
    rec = report["recovery"]
    if not rec["main_process"]:  # under accelerate launch / torchrun: the main process reports and writes
        return 0
    summary = {k: rec[k] for k in ("out", "records", "optimizer_steps", "first_loss", "last_loss", "seconds",
                                   "samples_per_s", "masked_linears")}
    print(json.dumps(summary, indent=2))
    if args.json:
        write_json(args.json, report, overwrite=args.overwrite)
    return 0
