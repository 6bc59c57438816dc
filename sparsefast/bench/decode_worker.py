"""One sparsefast decode variant — a checkpoint, a dtype, eager or compiled — loaded once in a process of its own and
timed on request, for sparsefast.bench.decode_run. Each variant runs alone in its process because the CPU kernels and
MKL run on OpenMP, whose workers wait worse when several threads of one process have run torch ops (the CPU
extension's notes, csrc/cpu/ops_cpu.cpp): one engine thread per process is the condition `sparsefast serve` runs in.
For the same reason the worker loads, swaps and builds its engine on a thread that exits before the first request
(sparsefast.serve.engine.build_in_thread); runs before 2026-12-05 12:30 UTC built on the main thread, which made
every sparsefast variant about 2x slower than `sparsefast serve` runs it.

    python -m sparsefast.bench.decode_worker CKPT --dtype float32 --compile on --threads 2 --max-batch 8 --max-len 97

Protocol (sparsefast/bench/peer_worker.py's): {"ready": {...}} once loaded (weight bytes per token, the sparse layers
swapped in and what was chosen for each, compile seconds, load time); then per JSON line {"prompts": [...],
"new_tokens": N}: one prompt → sparsefast.bench.decode.engine_batch1, several → engine_concurrent; {"op":
"choices", "loads": K}: K more timed swaps of this checkpoint (the calibration cache cleared before each), the
layers each one swapped in (is the load-time kernel choice stable?). An empty line or EOF ends it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from sparsefast.bench.peer_worker import protocol_stream, serve_requests
from sparsefast.device import THREADS_HELP, parse_threads, set_cpu_threads
from sparsefast.serve.compiled import COMPILE_MODES
from sparsefast.serve.engine import build_in_thread


def _swap(model, sparse: str, int8_activations: bool = False) -> dict[str, str]:
    """sparsify_ in `sparse` mode: {layer: chosen} for every candidate layer ({} for "off")."""
    from sparsefast.nn import SparsifyConfig, sparsify_

    config = SparsifyConfig(mode=sparse, int8_activations=int8_activations)
    return {name: rec["chosen"] for name, rec in sparsify_(model, config).items()}


def load_variant(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(engine (started), model, ready info) for the worker's options."""
    import torch

    from sparsefast.api import load
    from sparsefast.bench.decode import IdTokenizer, weight_bytes_per_token
    from sparsefast.nn.dense_linear import DenseCpuLinear
    from sparsefast.serve.engine import GenerationEngine

    set_cpu_threads(parse_threads(args.threads))
    t0 = time.perf_counter()
    model, _ = load(args.checkpoint, dtype=args.dtype, device=args.device)
    loaded = time.perf_counter() - t0
    chosen = _swap(model, args.sparse, args.int8_activations)
    swapped = time.perf_counter() - t0 - loaded
    engine = GenerationEngine(model, IdTokenizer(), max_batch=args.max_batch, max_queue=args.max_batch,
                              max_model_len=args.max_len, device=args.device, compile=args.compile)
    engine.start()
    info = {"weight_bytes_per_token": weight_bytes_per_token(model), "dtype": str(model.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "load_s": loaded, "swap_s": swapped,
            "swapped": sorted(n for n, c in chosen.items() if c != "dense"), "chosen": chosen,
            "dense_kernel_layers": sum(isinstance(m, DenseCpuLinear) for m in model.modules()),
            "compile": args.compile, "compiled": bool(engine.compile_seconds),
            "compile_seconds": engine.compile_seconds,
            "inductor_cache": getattr(engine.runner, "cache_dir", None)}
    return engine, model, info


def kernel_choices(args: argparse.Namespace, loads: int) -> list[list[str]]:
    """The layers swapped in by `loads` fresh timed swaps of the checkpoint (calibration cache cleared before each)."""
    from sparsefast.api import load
    from sparsefast.nn.dispatch import clear_calibration_cache

    runs = []
    for _ in range(loads):
        clear_calibration_cache()
        model, _ = load(args.checkpoint, dtype=args.dtype, device=args.device)
        runs.append(sorted(n for n, c in _swap(model, args.sparse, args.int8_activations).items() if c != "dense"))
        del model
    return runs


def handler(args: argparse.Namespace, engine: Any) -> Callable[[dict], dict]:
    """request -> reply of the protocol."""
    from sparsefast.bench.decode import engine_batch1, engine_concurrent

    def handle(request: dict) -> dict:
        if request.get("op") == "choices":
            loads = int(request["loads"])
            return {"result": {"swapped_per_load": build_in_thread(lambda: kernel_choices(args, loads))}}
        prompts, n = request["prompts"], int(request["new_tokens"])
        if len(prompts) == 1:
            return {"result": engine_batch1(engine, prompts[0], n)}
        return {"result": engine_concurrent(engine, prompts, n)}

    return handle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint sparsefast.load reads (dense or mask-pruned)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--sparse", default="auto", help="sparsify_ mode: auto (timed CPU swap), sparse24, off")
    p.add_argument("--int8-activations", action="store_true",
                   help="quantize activations to int8 too (an int8 checkpoint; SparsifyConfig.int8_activations)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES)
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-len", type=int, required=True)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    out = protocol_stream()
    # built on a thread that exits, as `sparsefast serve` builds (sparsefast.serve.engine.build_in_thread: why)
    engine, _model, info = build_in_thread(lambda: load_variant(args))
    try:
        serve_requests(out, info, handler(args, engine))
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
