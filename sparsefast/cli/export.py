"""`sparsefast export MODEL --to {gguf,vllm} --out PATH`: a dense, mask-pruned or structurally pruned model as files
the engines users already run load.

Examples:
    sparsefast export smollm2-s20 --to gguf --out smollm2-s20.gguf --outtype q8_0     # llama.cpp / Ollama
    sparsefast export smollm2-s20 --to vllm --out smollm2-s20-vllm                    # vllm serve DIR

gguf: one file; layers with different widths use llama.cpp's `deci` architecture (per-layer head counts and MLP
lengths), equal widths the plain `llama` one. vllm: a directory; equal widths give a plain LlamaForCausalLM-family
config, different widths a DeciLMForCausalLM (nemotron-nas) one whose pruned query heads are zero-padded back to the
model's head count (exact; sparsefast.json says how many bytes that costs). Only structural pruning makes either
engine faster: the zeros of a mask-pruned model are computed densely there.
"""

from __future__ import annotations

import argparse

from sparsefast.export import OUTTYPES, TARGETS, VLLM_OUTTYPES  # imports no torch


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a (pruned) model as GGUF (llama.cpp) or a vLLM directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir (dense, mask-pruned or structural), hub id, .gguf or 'smollm2'")
    p.add_argument("--to", required=True, choices=TARGETS, help="gguf: one .gguf file; vllm: a checkpoint directory")
    p.add_argument("--out", required=True, help="output .gguf file (--to gguf) or directory (--to vllm)")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES,
                   help="weight type: f32 (default), f16, bf16, q8_0 (gguf only); norms stay f32")
    p.add_argument("--overwrite", action="store_true", help="replace an output sparsefast wrote earlier")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from sparsefast.models import local_source_paths

    if args.to == "vllm" and args.outtype not in VLLM_OUTTYPES:
        raise ValueError(f"--outtype {args.outtype} is a GGUF type; --to vllm writes {', '.join(VLLM_OUTTYPES)} "
                         "safetensors (quantize in vLLM instead)")
    sources = local_source_paths(args.model)
    # the output is checked (a directory also claimed) before the model is loaded
    if args.to == "gguf":
        from sparsefast.export.gguf import check_gguf_output, export_gguf

        check_gguf_output(args.out, overwrite=args.overwrite, outtype=args.outtype, sources=sources)
        model, tokenizer = _load(args.model)
        path = export_gguf(model, tokenizer, args.out, outtype=args.outtype, overwrite=args.overwrite,
                           sources=sources)
        print(json.dumps({"out": str(path), "bytes": path.stat().st_size, "outtype": args.outtype}))
        return 0
    from sparsefast.checkpoint import OutputClaim
    from sparsefast.export.vllm import export_vllm

    with OutputClaim(args.out, args.overwrite, sources=sources) as claim:  # a second run on --out stops here
        model, tokenizer = _load(args.model)
        print(json.dumps(export_vllm(model, tokenizer, claim, outtype=args.outtype, source=args.model)))
    return 0


def _load(model: str):
    from sparsefast.api import load

    return load(model)
