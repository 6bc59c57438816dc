"""Decode speed of the generation engine in gpt-fast's units, side by side in one run: dense, structural 20%
(block-wise; a checkpoint from `sparsefast prune-structured`, or pruned in memory) and 2:4 (magnitude, in memory;
through `prepare_model(sparse="auto")`: Sparse24Linear on CUDA, the measured SparseLinear swap on CPU),
with `model.generate` and transformers' continuous batching
(`generate_batch`, paged cache) on the same models as the peers.

Per variant and repeat (variants interleaved, so slow phases of a shared machine hit all of them):
* engine batch 1: tokens/s end to end (N new tokens / time from submit to the last token) and decode-only
  ((N - 1) / time from the first to the last token), TTFT;
* `model.generate(do_sample=False)` batch 1, N tokens (dense; every variant with --generate-all): tokens/s end to
  end (the engine-vs-generate ratio uses the end-to-end figures of both);
* engine with C concurrent requests (submitted together): output-token throughput = C·N / (last token − submit);
* once per variant, on CPU, not with --dry-run: transformers continuous batching, batch 1 and C (tokens/s, or the
  error it raised).
Weight bytes per token: every parameter and buffer the forward reads (shared tensors once; an untied input
embedding counts one row, the LM head counts whole), so weight GB/s = bytes/token × tokens/s; the roofline is the
copy bandwidth measured in the same run (torch copy of 256 MiB, bytes read + written) and a read-only pass
(torch.sum over 256 MiB). Prompts are random token ids; EOS is ignored so every request makes exactly N tokens.

Usage (CPU, SmolLM2; make the structural checkpoint first, it is not timed):
    sparsefast prune-structured smollm2 --ratio 0.2 --importance element1 --data-dir ../shared/data --out /tmp/s20
    bash /tmp/quiet.sh .venv/bin/python bench/e2e/bench_decode.py --model smollm2 --structural /tmp/s20
GPU (bench/gpu/run.sh): --model llama-7b-random --device cuda (structural pruned in memory with l2 importance).
Dry run: --model llama-tiny-random --dry-run (a few tokens, writes under /tmp unless --out is given).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.micro.common import cpu_info, run_metadata  # noqa: E402
from sparsefast.checkpoint import check_output_file, write_json  # noqa: E402
from sparsefast.cli.bench import FULL_LAYERS, RANDOM_MODELS, build_model  # noqa: E402
from sparsefast.serve.engine import GenerationEngine, SamplingParams  # noqa: E402
from sparsefast.serve.sparse import prepare_model  # noqa: E402

VARIANTS = ("dense", "structural", "sparse24")


class IdTokenizer:
    """For random-weight models: token ids as text (the engine needs decode; there is no EOS)."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a checkpoint, llama-7b-random, "
                                                      "llama-tiny-random")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of a *-random model (default: all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--structural", default=None, help="structural checkpoint of the same model (default: prune "
                                                      "20%% block-wise in memory with --struct-importance)")
    p.add_argument("--struct-importance", default="l2", help="importance when pruning in memory (default l2: no "
                                                             "calibration data; the speed does not depend on it)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-generate", action="store_true", help="skip the model.generate baseline")
    p.add_argument("--generate-all", action="store_true",
                   help="model.generate on every variant (default: dense only; it is the slow part of a CPU run)")
    p.add_argument("--no-cb", action="store_true", help="skip transformers continuous batching")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="result directory (default bench/results; /tmp with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes: checks the harness, timings mean nothing")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "dense" not in args.variants:
        raise SystemExit(f"bench_decode: --variants must include dense and only {', '.join(VARIANTS)}; got {bad}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_decode: --device cuda but CUDA is not available")
    for name in ("prompt_len", "new_tokens", "concurrency", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench_decode: --{name.replace('_', '-')} must be >= 1")
    if args.dry_run:  # continuous batching is skipped: its manager setup alone takes ~40 s on a CPU
        args.new_tokens, args.repeats, args.prompt_len = min(args.new_tokens, 6), 1, min(args.prompt_len, 8)
        args.concurrency, args.no_cb = min(args.concurrency, 3), True
    return args


# ---- models ----------------------------------------------------------------------------------------------------
def load_variants(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """{variant: model}, tokenizer, {variant: how it was made}."""
    from sparsefast.api import load, prune
    from sparsefast.config import MagnitudeConfig

    random = args.model in RANDOM_MODELS

    def fresh():
        if random:
            layers = args.layers or FULL_LAYERS.get(args.model, 4)
            return build_model(args.model, layers, device)[0], IdTokenizer()
        return load(args.model, device=device)

    models, notes = {}, {}
    models["dense"], tok = fresh()
    notes["dense"] = f"{args.model} as loaded ({next(models['dense'].parameters()).dtype})"
    if "structural" in args.variants:
        if args.structural:
            models["structural"], _ = load(args.structural, device=device)
            notes["structural"] = f"checkpoint {args.structural}"
        else:
            from sparsefast.prune.structural import prune_structured
            from sparsefast.prune.structural.config import StructuralConfig

            model, _ = fresh()
            cfg = StructuralConfig(ratio=0.2, importance=args.struct_importance, strategy="block")
            prune_structured(model, tok if not random else None, cfg, calib=_random_calib(model, cfg))
            models["structural"] = model.eval()
            notes["structural"] = f"in memory: 20% block-wise, {args.struct_importance}, default layer range"
    if "sparse24" in args.variants:
        model, _ = fresh()
        prune(model, MagnitudeConfig(pattern="2:4", device=device.type), progress=False)
        swapped = prepare_model(model, "auto", device)
        models["sparse24"] = model
        kind = "Sparse24Linear" if device.type == "cuda" else "SparseLinear (measured CPU swap)"
        notes["sparse24"] = ("magnitude 2:4; " + (f"{len(swapped)} linears as {kind}" if swapped else
                                                  "dense-with-zeros (no linear swapped)"))
    return models, tok, notes


def _random_calib(model, cfg) -> torch.Tensor | None:
    """Gradient importances on a random model get random ids (no text); l2/random need none."""
    if not cfg.needs_gradients:
        return None
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (cfg.nsamples, cfg.seqlen), generator=gen).to(model.device)


def weight_bytes_per_token(model) -> int:
    """Bytes of every parameter/buffer a decode step reads (see the module docstring)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == \
        embed.data_ptr()
    seen, total = set(), 0
    for mod in model.modules():
        if hasattr(mod, "backend_for") and hasattr(mod, "packed"):  # SparseLinear: count the path a token takes
            probe = torch.zeros(1, mod.in_features, dtype=embed.dtype, device=embed.device)
            use_dense = mod.backend_for(probe) == "dense" and getattr(mod, "dense", None) is not None
            read = [mod.dense] if use_dense else list(mod.packed())
            read += [mod.bias] if mod.bias is not None else []
            total += sum(t.numel() * t.element_size() for t in read)
            seen.update(t.data_ptr() for t in mod.buffers())
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.data_ptr() == embed.data_ptr() and not tied:
            total += embed.shape[1] * embed.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


# ---- measurements ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> dict[str, float]:
    """Best of 5: copy GB/s (read + write bytes) and read GB/s (a sum over the buffer)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        t1 = time.perf_counter()
        src.sum()
        _sync(device)
        t2 = time.perf_counter()
        copy.append(2 * nbytes / (t1 - t0) / 1e9)
        read.append(nbytes / (t2 - t1) / 1e9)
    return {"copy_gbs": max(copy), "read_gbs": max(read), "buffer_bytes": nbytes}


def engine_batch1(engine: GenerationEngine, prompt: list[int], n: int) -> dict[str, float]:
    stream = engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    events = [e for e in stream if e.token_ids]
    assert len(events) == n, f"engine produced {len(events)} tokens, expected {n}"
    first, last = events[0].time, events[-1].time
    return {"tokens_per_s": n / (last - stream.submitted), "decode_tokens_per_s": (n - 1) / (last - first)
            if n > 1 else float("nan"), "ttft_s": first - stream.submitted,
            "median_itl_s": _median_gap([e.time for e in events])}


def _median_gap(times: list[float]) -> float:
    """Median time between consecutive tokens: robust to the few-ms stalls a shared CPU adds to some steps."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def engine_concurrent(engine: GenerationEngine, prompts: list[list[int]], n: int) -> dict[str, float]:
    t0 = time.perf_counter()
    streams = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p in prompts]
    ends, tpots, itls = [], [], []
    for s in streams:
        events = [e for e in s if e.token_ids]
        assert len(events) == n
        ends.append(events[-1].time)
        tpots.append((events[-1].time - events[0].time) / max(n - 1, 1))
        itls.append(_median_gap([e.time for e in events]))
    wall = max(ends) - t0
    return {"output_tokens_per_s": len(prompts) * n / wall, "wall_s": wall,
            "tpot_s_median": statistics.median(tpots), "median_itl_s": statistics.median(itls)}


class _TokenClock:
    """A generate() streamer that only timestamps: put() is called with the prompt, then once per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_batch1(model, prompt: list[int], n: int, device: torch.device) -> dict[str, float]:
    ids = torch.tensor([prompt], device=device)
    clock = _TokenClock()
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
    _sync(device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == len(prompt) + n
    return {"tokens_per_s": n / dt, "median_itl_s": _median_gap(clock.times[1:])}


def transformers_cb(model, prompts: list[list[int]], n: int) -> dict[str, Any]:
    """transformers' continuous batching on the same prompts: tokens/s (all requests) or the error it raised."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    try:
        out = model.generate_batch(prompts, generation_config=cfg, warmup=False)
    except Exception as exc:  # recorded: whether the peer handles this checkpoint is part of the measurement
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    dt = time.perf_counter() - t0
    made = [len(o.generated_tokens) for o in out.values()]
    failed = [rid for rid, o in out.items() if getattr(o, "error", None)]
    res: dict[str, Any] = {"tokens_per_s": sum(made) / dt, "wall_s": dt, "generated": made}
    if failed or sum(made) < len(prompts) * n:
        res["error"] = f"{len(failed)} failed requests, {sum(made)} of {len(prompts) * n} tokens"
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = Path(args.out) if args.out else (Path("/tmp") if args.dry_run else REPO / "bench" / "results")
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_")
    out_path = out_dir / f"{datetime.date.today().isoformat()}-{tag}-decode-{Path(args.model).name}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_file(out_path)  # before any work: a result that cannot be written is a wasted run
    models, tok, notes = load_variants(args, device)
    vocab = models["dense"].get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist() for _ in range(args.concurrency)]
    max_len = args.prompt_len + args.new_tokens + 1
    engines = {v: GenerationEngine(m, tok, max_batch=args.concurrency, max_model_len=max_len, device=args.device)
               for v, m in models.items()}
    for e in engines.values():
        e.start()
    raw: dict[str, dict[str, list]] = {v: {"engine_b1": [], "generate_b1": [], "engine_concurrent": []}
                                       for v in models}
    cb: dict[str, dict[str, Any]] = {}
    try:
        for v, e in engines.items():  # warm-up: first calls allocate and pick kernels
            engine_batch1(e, prompts[0], 2)
            engine_concurrent(e, prompts, 2)
        for rep in range(args.repeats):
            for v, e in engines.items():
                raw[v]["engine_b1"].append(engine_batch1(e, prompts[0], args.new_tokens))
                if not args.no_generate and (v == "dense" or args.generate_all):
                    raw[v]["generate_b1"].append(generate_batch1(models[v], prompts[0], args.new_tokens, device))
                raw[v]["engine_concurrent"].append(engine_concurrent(e, prompts, args.new_tokens))
                print(f"[{rep}] {v}: engine b1 {raw[v]['engine_b1'][-1]['tokens_per_s']:.2f} tok/s, "
                      f"c{args.concurrency} {raw[v]['engine_concurrent'][-1]['output_tokens_per_s']:.2f} tok/s",
                      flush=True)
        if not args.no_cb and args.device == "cpu":
            for v in ("dense", "structural"):
                if v in models:
                    cb[v] = {"batch1": transformers_cb(models[v], prompts[:1], args.new_tokens),
                             f"batch{args.concurrency}": transformers_cb(models[v], prompts, args.new_tokens)}
    finally:
        for e in engines.values():
            e.shutdown()
    bw = memory_bandwidth(device)
    result = summarize(args, models, notes, raw, cb, bw)
    path = write_json(out_path, result)
    for v, s in result["summary"].items():
        print(f"{v}: {s}")
    print(f"wrote {path}")
    return 0


def _med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def summarize(args, models, notes, raw, cb, bw) -> dict[str, Any]:
    """Medians over repeats. Two views of the same runs: wall (tokens / elapsed time) and steady-state (1 / median
    inter-token latency, which drops the stalls a shared CPU adds to some steps)."""
    c = args.concurrency
    summary: dict[str, dict[str, Any]] = {}
    for v, m in models.items():
        bytes_tok = weight_bytes_per_token(m)
        b1 = _med(raw[v]["engine_b1"], "tokens_per_s")
        dec = _med(raw[v]["engine_b1"], "decode_tokens_per_s")
        itl = _med(raw[v]["engine_b1"], "median_itl_s")
        gen_tps = _med(raw[v]["generate_b1"], "tokens_per_s")
        gen_itl = _med(raw[v]["generate_b1"], "median_itl_s")
        conc = _med(raw[v]["engine_concurrent"], "output_tokens_per_s")
        conc_itl = _med(raw[v]["engine_concurrent"], "median_itl_s")
        steady = 1 / itl
        summary[v] = {
            "weight_bytes_per_token": bytes_tok,
            "engine_b1_tokens_per_s": b1, "engine_b1_decode_tokens_per_s": dec,
            "engine_b1_steady_tokens_per_s": steady,
            "weight_gbs_decode": bytes_tok * dec / 1e9, "weight_gbs_steady": bytes_tok * steady / 1e9,
            "fraction_of_copy_bw_steady": bytes_tok * steady / 1e9 / bw["copy_gbs"],
            "fraction_of_read_bw_steady": bytes_tok * steady / 1e9 / bw["read_gbs"],
            "generate_b1_tokens_per_s": gen_tps,
            "generate_b1_steady_tokens_per_s": 1 / gen_itl if gen_itl else None,
            "engine_vs_generate": b1 / gen_tps if gen_tps else None,
            "engine_vs_generate_steady": steady * gen_itl if gen_itl else None,
            f"engine_c{c}_tokens_per_s": conc, f"engine_c{c}_steady_tokens_per_s": c / conc_itl,
            f"c{c}_vs_b1": conc / b1, f"c{c}_vs_b1_steady": c / conc_itl / steady,
        }
    dense = summary["dense"]
    for v, s in summary.items():
        s["b1_decode_vs_dense"] = s["engine_b1_decode_tokens_per_s"] / dense["engine_b1_decode_tokens_per_s"]
        s["b1_steady_vs_dense"] = s["engine_b1_steady_tokens_per_s"] / dense["engine_b1_steady_tokens_per_s"]
        s["bytes_vs_dense"] = s["weight_bytes_per_token"] / dense["weight_bytes_per_token"]
    return {"what": "decode", "metadata": run_metadata(), "cpu": cpu_info(), "torch_threads": torch.get_num_threads(),
            "args": {k: v for k, v in vars(args).items()}, "variants": notes, "memory_bandwidth": bw,
            "summary": summary, "transformers_continuous_batching": cb, "raw": raw}


if __name__ == "__main__":
    sys.exit(main())
