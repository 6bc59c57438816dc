"""`sparsefast serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

MODEL is anything `sparsefast.models.load_model` takes: `smollm2`, a dense / mask-pruned / structurally pruned
checkpoint dir, a .gguf file, a hub id. The server binds 127.0.0.1 unless --host says otherwise; /health answers 503
while the model loads and 200 once it serves. Example:

  sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --out smollm2-s20
  sparsefast serve smollm2-s20 --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' \\
       -d '{"model": "smollm2-s20", "prompt": "The capital of France is", "max_tokens": 16}'
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sparsefast.config.sparsify import SPARSE_MODES, SparsifyConfig
from sparsefast.device import DTYPE_CHOICES, THREADS_HELP, parse_threads
from sparsefast.serve.compiled import COMPILE_MODES

if TYPE_CHECKING:  # the serve stack (fastapi, torch) is imported in run(): `sparsefast --help` stays light
    from transformers import PreTrainedTokenizerBase

    from sparsefast.serve.app import Loader
    from sparsefast.serve.engine import GenerationEngine


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smollm2, a checkpoint dir (dense, mask-pruned or structural), a .gguf or a hub id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--allowed-origins", type=_origins, default=(), metavar="ORIGINS",
                   help="comma list of browser origins allowed to call the server (CORS), e.g. "
                        "http://localhost:3000, or * for any (default: none, no CORS headers)")
    p.add_argument("--api-key", default=os.environ.get("SPARSEFAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPARSEFAST_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together per step (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    p.add_argument("--admit-wait-ms", type=float, default=None,
                   help="an idle server waits while requests keep arriving, each within this many ms of the last "
                        "(at most 10x in all), so a burst is prefilled in one forward instead of the first request "
                        "starting alone and stalling behind the rest (default: sparsefast.serve.engine.ADMIT_WAIT_S, "
                        "5 ms; 0: no wait)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length: prompt + generated tokens (default: the model's maximum)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: only the context bounds it)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit, 413 above (default 1 MiB)")
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file, for tokenizers without one (or to override it)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--sparse", default="auto", choices=SPARSE_MODES,
                   help="sparse linears: auto (default; 2:4 layers become Sparse24Linear on CUDA), sparse24 (that "
                        "swap on any device) or off (serve the model as loaded); see sparsefast.nn.sparsify_")
    add_engine_options(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
    return p


def _origins(text: str) -> tuple[str, ...]:
    """--allowed-origins: "*" or origins as browsers send them (scheme://host[:port], no path)."""
    from urllib.parse import urlsplit

    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin; give scheme://host[:port] (e.g. "
                                             "http://localhost:3000) or *")
    return origins


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --compile, --threads and --int8-activations, the engine settings `serve` and `generate` share."""
    p.add_argument("--threads", default="auto", help=THREADS_HELP + " (set before the model loads)")
    p.add_argument("--dtype", default="auto", choices=(*DTYPE_CHOICES, "bf16", "fp32"),
                   help="weights and activations: auto (the checkpoint's; float32 on CPU for half types), float32, "
                        "bfloat16 / bf16 (half the weight bytes per token), float16")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="decode step compiled with torch.compile at load, one graph per batch bucket, kept in "
                        "inductor's disk cache (sparsefast.serve.compiled): on, auto (eager where compiling fails), "
                        "off (eager; the default, because a first load compiles for minutes; on a 2-core CPU the "
                        "compiled step served SmolLM2 1.2x faster at 1 and 1.14x at 8 concurrent requests, "
                        "bench/RESULTS.md)")
    p.add_argument("--int8-activations", action="store_true",
                   help="with an int8 checkpoint (prune --quantize int8) and --sparse auto: quantize each linear's "
                        "input to int8 per token and 32-column block too (dynamic W8A8, as llama.cpp's Q8_0; integer "
                        "dot products on CPUs with AVX-512 VNNI + VBMI, its torch twin elsewhere; changes the "
                        "numerics, see bench/RESULTS.md)")


def check_args(args: argparse.Namespace) -> str | None:
    """Reject bad settings before anything loads; returns the chat template text (or None)."""
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_model_len", "max_tokens_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.admit_wait_ms is not None and not 0 <= args.admit_wait_ms <= 1000:
        raise ValueError(f"--admit-wait-ms must be in 0..1000, got {args.admit_wait_ms:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    parse_threads(args.threads)
    SparsifyConfig(mode=args.sparse, int8_activations=args.int8_activations)  # --int8-activations needs auto
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty; give a non-empty key or leave it out")
    from sparsefast.models import resolve_model_source

    resolve_model_source(args.model)  # a missing path or unsupported file fails here, before the port opens
    if args.chat_template is None:
        return None
    path = Path(args.chat_template)
    if not path.is_file():
        raise FileNotFoundError(f"--chat-template {path}: no such file; give a Jinja template file")
    return path.read_text()


def build_loader(args: argparse.Namespace) -> Loader:
    """() -> (engine, tokenizer): loads the model and wraps it in a GenerationEngine (run in the loader thread)."""

    def load() -> tuple[GenerationEngine, PreTrainedTokenizerBase]:
        from sparsefast.device import resolve_dtype
        from sparsefast.models import load_model
        from sparsefast.nn import sparsify_, swapped_layer_names
        from sparsefast.serve.engine import GenerationEngine

        sparsify = SparsifyConfig(mode=args.sparse, int8_activations=args.int8_activations)
        model, tokenizer = load_model(args.model, device=args.device, dtype=resolve_dtype(args.dtype))
        device = str(next(model.parameters()).device)
        swapped = swapped_layer_names(sparsify_(model, sparsify))
        logging.getLogger("sparsefast.serve").info("sparse linears swapped in: %d", len(swapped))
        engine = GenerationEngine(model, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue,
                                  max_model_len=args.max_model_len, device=device, compile=args.compile,
                                  **({} if args.admit_wait_ms is None else {"admit_wait": args.admit_wait_ms / 1000}))
        if engine.compile_seconds:
            logging.getLogger("sparsefast.serve").info(
                "decode step compiled for batch buckets %s in %.1f s (inductor cache %s)",
                list(engine.compile_seconds), sum(engine.compile_seconds.values()), engine.runner.cache_dir)
        return engine, tokenizer

    return load


def run(args: argparse.Namespace) -> int:
    template = check_args(args)
    import uvicorn

    from sparsefast.device import set_cpu_threads

    threads = set_cpu_threads(parse_threads(args.threads))  # before the loader thread and the server start

    from sparsefast.serve.app import ServerConfig, create_app

    config = ServerConfig(model_name=args.served_model_name or args.model, api_key=args.api_key,
                          max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                          chat_template=template, allowed_origins=args.allowed_origins)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error(exc: BaseException) -> None:
        failure.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(build_loader(args), config, on_load_error=stop_on_load_error)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("sparsefast.serve").info("CPU threads: %d (--threads %s)", threads, args.threads)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    server.run()
    if failure:
        raise RuntimeError(f"could not load {args.model!r}: {failure[0]}")
    return 0
