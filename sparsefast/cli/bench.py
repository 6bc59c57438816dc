"""`sparsefast bench prune|serve|decode`: measurements side by side in one run, written as JSON (and plots) with the
machine, versions, commit and load. The implementations are sparsefast.bench's, shared with the scripts under bench/.

prune: pruning speed of Wanda (triton kernels), Wanda (torch twins), SparseGPT and magnitude on the same model with
the same calibration ids, in one run: calibration-forward and metric+mask time per layer and in total, peak memory,
ratios against Wanda. `llama-7b-random` is LLaMA-7B's shapes with random bf16 weights and `--layers N` decoder layers
(`llama-tiny-random`: small shapes, for dry runs); timings do not depend on the values.
Example (GPU): sparsefast bench prune llama-7b-random --layers 4 --json out.json

serve: servers side by side (TTFT, TPOT, ITL, throughput as vLLM defines them), a JSON with raw per-level metrics and
ratios, a PNG of TPOT and output throughput against concurrency.
Example (CPU, SmolLM2 dense vs 20% structural vs the dense model under `transformers serve`):
  sparsefast bench serve --variant dense=sparsefast:smollm2 --variant s20=sparsefast:ckpt/smollm2-s20 \\
      --variant transformers-serve=transformers:ckpt/smollm2-dense --baseline dense --peer transformers-serve \\
      --concurrency 1,8 --json out.json --plot out.png

decode: sparsefast's decode (dense / 2:4 / 50%, fp32 / bf16, compiled / eager) next to llama.cpp and vLLM CPU, batch 1
and concurrent; `sparsefast bench decode --help` (and --dry-run for a quick check of the harness).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sparsefast.bench.prune_speed import METHOD_CONFIGS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: pruning speed, serving, decode next to llama.cpp / vLLM",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench_command", required=True)
    q = sub.add_parser("prune", help="pruning speed: wanda (triton / torch), sparsegpt, magnitude side by side")
    q.add_argument("model", nargs="?", default=None,
                   help="llama-7b-random (default on CUDA) or a load_model name, e.g. smollm2 (default on CPU)")
    q.add_argument("--layers", type=int, default=None, help="decoder layers of a *-random model (default 4)")
    q.add_argument("--methods", default=None,
                   help=f"comma list of {', '.join(METHOD_CONFIGS)} (default all; on CPU without CUDA all but "
                        "wanda-triton, whose interpreter timings mean nothing)")
    q.add_argument("--pattern", default="unstructured", help="unstructured (default, sparsity 0.5) or N:M")
    q.add_argument("--nsamples", type=int, default=None, help="calibration samples (default 128 on CUDA, 4 on CPU)")
    q.add_argument("--seqlen", type=int, default=None, help="tokens per sample (default 2048 on CUDA, 128 on CPU)")
    q.add_argument("--batch-size", type=int, default=8, help="calibration samples per layer forward (default 8)")
    q.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    q.add_argument("--seed", type=int, default=0, help="seed of the random ids and weights (default 0)")
    q.add_argument("--json", default=None,
                   help="write the result JSON here (atomically; refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    q.set_defaults(func=run_prune)
    _add_serve_parser(sub)
    _add_decode_parser(sub)
    return p


def _add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    q = sub.add_parser("serve", help="serving benchmark: TTFT, TPOT, ITL, throughput of servers side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("--variant", action="append", required=True, metavar="NAME=KIND:TARGET",
                   help="a server: NAME=sparsefast:MODEL, NAME=transformers:DIR or NAME=url:http://HOST:PORT "
                        "(repeat; measured round-robin in this order)")
    q.add_argument("--baseline", default=None, help="variant the throughput/TPOT ratios are against (default first)")
    q.add_argument("--peer", default=None, help="variant that is the peer server (TPOT goal: baseline <= peer)")
    q.add_argument("--concurrency", default="1,8", help="comma list of concurrency levels (default 1,8)")
    q.add_argument("--num-prompts", default=None,
                   help="requests per level: one number, or a comma list matching --concurrency "
                        "(default 4 x concurrency, at least 4)")
    q.add_argument("--rounds", type=int, default=1,
                   help="rounds per level, variants round-robin in alternating order; metrics pool all rounds")
    q.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    q.add_argument("--output-len", type=int, default=64, help="generated tokens per request (default 64)")
    q.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate in requests/s (default inf: all at once, capped by concurrency)")
    q.add_argument("--tokenizer", default="smollm2", help="model whose tokenizer makes the prompts (default smollm2)")
    q.add_argument("--device", default="cpu", help="device the launched servers use (default cpu)")
    q.add_argument("--max-batch", type=int, default=None, help="sparsefast serve --max-batch (default max concurrency)")
    q.add_argument("--load-timeout", type=float, default=300.0, help="seconds a server may take to load (default 300)")
    q.add_argument("--log-dir", default=None, help="server logs (default: beside --json, else ./bench-serve-logs)")
    q.add_argument("--json", default=None,
                   help="write the result JSON here (atomically; refused if it exists, unless --overwrite)")
    q.add_argument("--plot", default=None, help="write the PNG plot here (refused if it exists, unless --overwrite)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --json / --plot file")
    q.set_defaults(func=run_serve)
    return q


def _add_decode_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sparsefast.bench.decode_options import add_decode_arguments

    q = sub.add_parser("decode", help="decode speed: sparsefast dense / 2:4 / 50%% x fp32 / bf16 x eager / compiled, "
                                      "llama.cpp and vLLM side by side, GB/s vs copy bandwidth")
    add_decode_arguments(q)
    q.set_defaults(func=run_decode)
    return q


def run_decode(args: argparse.Namespace) -> int:
    from sparsefast.bench.decode_options import config_from_args
    from sparsefast.bench.decode_run import run_decode_bench

    result = run_decode_bench(config_from_args(args))
    return 1 if result and result["failed"] else 0


def prune_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of sparsefast.bench.prune_speed.run_prune_bench from parsed `bench prune` options."""
    return {"model": args.model, "layers": args.layers, "methods": args.methods, "pattern": args.pattern,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "device": args.device,
            "seed": args.seed}


def run_prune(args: argparse.Namespace) -> int:
    from sparsefast.bench.prune_speed import run_prune_bench
    from sparsefast.checkpoint import check_output_file, write_json

    if args.json:
        check_output_file(args.json, overwrite=args.overwrite)  # fails before the benchmark, not after it
    result = run_prune_bench(**prune_options(args))
    if "ratios" in result:
        print(f"ratios vs {result['ratios_vs']} (metric+mask, total): " + ", ".join(
            f"{m} {r['metric_mask_s'] or 0:.1f}x / {r['total_s'] or 0:.2f}x" for m, r in result["ratios"].items()))
    written = bool(args.json and result["methods"])  # a run that measured nothing writes nothing
    if written:
        write_json(args.json, result, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return _failed("bench prune", "method", result["failed"], written)


def run_serve(args: argparse.Namespace) -> int:
    from sparsefast.bench.serving_report import parse_int_list, run_serving_benchmark

    result = run_serving_benchmark(
        args.variant, concurrency=parse_int_list(args.concurrency, "--concurrency"),
        num_prompts=None if args.num_prompts is None else parse_int_list(args.num_prompts, "--num-prompts"),
        baseline=args.baseline, peer=args.peer, rounds=args.rounds, prompt_len=args.prompt_len,
        output_len=args.output_len, request_rate=args.request_rate, tokenizer=args.tokenizer, device=args.device,
        max_batch=args.max_batch, load_timeout=args.load_timeout, log_dir=args.log_dir, json_path=args.json,
        plot_path=args.plot, overwrite=args.overwrite)
    written = bool(args.json or args.plot) and len(result["failed"]) < len(result["variants"])
    return _failed("bench serve", "variant", result["failed"], written)


def _failed(command: str, what: str, failed: dict[str, str], written: bool) -> int:
    """Exit status of a benchmark: 0 when every method / variant ran, else 1 with one line on stderr naming them."""
    if not failed:
        return 0
    kept = "the result marks them failed" if written else "no result was written"
    reasons = "; ".join(f"{name}: {' '.join(why.split())[:300]}" for name, why in failed.items())  # one line
    print(f"sparsefast {command}: error: {len(failed)} {what}(s) failed ({reasons}); {kept}", file=sys.stderr)
    return 1
