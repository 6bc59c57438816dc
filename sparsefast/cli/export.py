"""`sparsefast export MODEL --to {gguf,vllm,vllm-sparse} --out PATH`: a dense, mask-pruned or structurally pruned
model as files the engines users already run load.

Examples:
    sparsefast export smollm2-s20 --to gguf --out smollm2-s20.gguf --outtype q8_0     # llama.cpp / Ollama
    sparsefast export smollm2-s20 --to vllm --out smollm2-s20-vllm                    # vllm serve DIR
    sparsefast export smollm2-wanda24 --to vllm-sparse --out smollm2-wanda24-vllm      # vllm serve DIR (plugin)

gguf: one file; layers with different widths use llama.cpp's `deci` architecture (per-layer head counts and MLP
lengths), equal widths the plain `llama` one. vllm: a directory; equal widths give a plain LlamaForCausalLM-family
config, different widths a DeciLMForCausalLM (nemotron-nas) one whose pruned query heads are zero-padded back to the
model's head count (exact; sparsefast.json says how many bytes that costs). vllm-sparse: a mask-pruned model for
vLLM with its sparse linears packed in sparsefast's CPU layouts, run by sparsefast's kernels through sparsefast's
vLLM plugin (installed with sparsefast in vLLM's environment); the layout of each layer is what `sparsefast serve`
would run on this machine (timed; --no-calibrate: 2:4 where the weights fit, else unstructured). Otherwise only
structural pruning makes either engine faster: the zeros of a mask-pruned model are computed densely there.
"""

from __future__ import annotations

import argparse

from sparsefast.export import OUTTYPES, TARGETS, VLLM_OUTTYPES, VLLM_SPARSE_OUTTYPES  # imports no torch


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a (pruned) model as GGUF (llama.cpp) or a vLLM directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir (dense, mask-pruned or structural), hub id, .gguf or 'smollm2'")
    p.add_argument("--to", required=True, choices=TARGETS,
                   help="gguf: one .gguf file; vllm: a checkpoint directory; vllm-sparse: a directory with packed "
                        "sparse layers for sparsefast's vLLM plugin")
    p.add_argument("--out", required=True, help="output .gguf file (--to gguf) or directory (--to vllm, vllm-sparse)")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES,
                   help="weight type: f32 (default), f16, bf16, q8_0 or q4_1 (gguf only); norms stay f32")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="--to vllm-sparse: choose each layer's layout without timing it (2:4 where the weights fit, "
                        "else unstructured)")
    p.add_argument("--overwrite", action="store_true", help="replace an output sparsefast wrote earlier")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    from sparsefast.models import local_source_paths

    if args.to == "vllm" and args.outtype not in VLLM_OUTTYPES:
        raise ValueError(f"--outtype {args.outtype} is a GGUF type; --to vllm writes {', '.join(VLLM_OUTTYPES)} "
                         "safetensors (quantize in vLLM instead)")
    if args.to == "vllm-sparse" and args.outtype not in VLLM_SPARSE_OUTTYPES:
        raise ValueError(f"--outtype {args.outtype}: --to vllm-sparse writes {', '.join(VLLM_SPARSE_OUTTYPES)} (the "
                         "dtypes of sparsefast's CPU kernels)")
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

    with OutputClaim(args.out, args.overwrite, sources=sources) as claim:  # a second run on --out stops here
        model, tokenizer = _load(args.model)
        if args.to == "vllm-sparse":
            from sparsefast.export.vllm_sparse import export_vllm_sparse

            summary = export_vllm_sparse(model, tokenizer, claim, outtype=args.outtype, calibrate=args.calibrate,
                                         source=args.model)
        else:
            from sparsefast.export.vllm import export_vllm

            summary = export_vllm(model, tokenizer, claim, outtype=args.outtype, source=args.model)
        print(json.dumps(summary))
    return 0


def _load(model: str):
    from sparsefast.api import load

    return load(model)
