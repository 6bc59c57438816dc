"""`sparsefast generate MODEL --prompt TEXT`: stream one completion to the terminal through the generation engine
(the same engine `sparsefast serve` runs), then print tokens/s.

Examples:
    sparsefast generate smollm2 --prompt "Write a haiku about pruning." --chat --max-tokens 64
    sparsefast generate pruned/ --prompt "Once upon a time" --temperature 0.8 --top-p 0.95 --seed 0
Greedy by default (--temperature 0). The text goes to stdout; loading notes and the speed line go to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from sparsefast.cli.serve import add_engine_options
from sparsefast.config.sparsify import SPARSE_MODES, SparsifyConfig
from sparsefast.device import parse_threads


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="stream a completion from a (pruned) model, print tokens/s",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="HF checkpoint dir (dense, mask-pruned or structural), hub id, .gguf or 'smollm2'")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (exactly --max-tokens)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--sparse", default="auto", choices=SPARSE_MODES,
                   help="auto: 2:4 linears run as Sparse24Linear on CUDA (default); off: as loaded")
    # off by default: one completion gains less than a first compile costs (a server compiles once, at load)
    add_engine_options(p)
    p.set_defaults(func=run)
    return p


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template; drop --chat to send the raw prompt")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run(args: argparse.Namespace) -> int:
    from sparsefast.serve.sampling import SamplingParams

    # every check on the request runs before the model is loaded
    if not args.prompt:
        raise ValueError("--prompt is empty; pass the text to continue")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop),
                            ignore_eos=args.ignore_eos).validate()
    threads = parse_threads(args.threads)
    sparsify = SparsifyConfig(mode=args.sparse, int8_activations=args.int8_activations)
    from sparsefast.api import load
    from sparsefast.device import resolve_device, set_cpu_threads
    from sparsefast.models import model_context
    from sparsefast.nn import sparsify_, swapped_layer_names
    from sparsefast.serve.engine import GenerationEngine, build_in_thread

    device = resolve_device(args.device)
    set_cpu_threads(threads)

    def build() -> tuple[GenerationEngine, list[int]]:
        # on a thread that exits before decoding starts (sparsefast.serve.engine.build_in_thread: why)
        t0 = time.perf_counter()
        model, tokenizer = load(args.model, device=device, dtype=args.dtype)
        swapped = swapped_layer_names(sparsify_(model, sparsify))
        prompt = _prompt_ids(tokenizer, args.prompt, args.chat)
        context = model_context(model)
        need = len(prompt) + params.max_tokens
        if context is not None and need > context:
            raise ValueError(f"prompt of {len(prompt)} tokens + --max-tokens {params.max_tokens} exceeds the "
                             f"model's context of {context} tokens; shorten the prompt or lower --max-tokens")
        note = f", {len(swapped)} linears as Sparse24Linear" if swapped else ""
        print(f"[loaded {args.model} in {time.perf_counter() - t0:.1f} s{note}]", file=sys.stderr, flush=True)
        return GenerationEngine(model, tokenizer, max_batch=1, max_queue=1, max_model_len=need, device=str(device),
                                compile=args.compile), prompt

    engine, prompt = build_in_thread(build)
    if engine.compile_seconds:
        print(f"[decode step compiled in {sum(engine.compile_seconds.values()):.1f} s; inductor cache "
              f"{engine.runner.cache_dir}]", file=sys.stderr, flush=True)
    engine.start()
    stream = engine.submit(prompt, params)
    first = last = None
    tokens, reason = 0, None
    try:
        for event in stream:
            if event.token_ids:
                first = event.time if first is None else first
                last = event.time
                tokens = event.completion_tokens
            sys.stdout.write(event.text)
            sys.stdout.flush()
            reason = event.finish_reason
    except KeyboardInterrupt:
        stream.cancel()
        reason = "cancelled"
    finally:
        engine.shutdown()
    sys.stdout.write("\n")
    if tokens == 0:
        print(f"[no tokens generated; finish: {reason}]", file=sys.stderr)
        return 130 if reason == "cancelled" else 0
    total = last - stream.submitted
    decode = f", decode {(tokens - 1) / (last - first):.2f} tokens/s" if tokens > 1 and last > first else ""
    print(f"[{tokens} tokens in {total:.2f} s: {tokens / total:.2f} tokens/s{decode}; time to first token "
          f"{first - stream.submitted:.3f} s; finish: {reason}]", file=sys.stderr)
    return 130 if reason == "cancelled" else 0
