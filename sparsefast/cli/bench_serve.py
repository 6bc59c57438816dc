"""`sparsefast bench serve`: the serving benchmark (sparsefast.serve.benchmark) from the command line: servers side by
side, JSON with raw per-level metrics and ratios, a PNG of TPOT and output throughput against concurrency.

Example (CPU, SmolLM2 dense vs 20% structural vs the dense model under `transformers serve`):
  sparsefast bench serve --variant dense=sparsefast:smollm2 --variant s20=sparsefast:ckpt/smollm2-s20 \\
      --variant transformers-serve=transformers:ckpt/smollm2-dense --baseline dense --peer transformers-serve \\
      --concurrency 1,8 --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path
from typing import Any


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    q.add_argument("--json", default=None, help="write the result JSON here (atomically)")
    q.add_argument("--plot", default=None, help="write the PNG plot here")
    q.set_defaults(func=run)
    return q


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must list integers >= 1, got {text!r}")
    return values


def default_metadata() -> dict[str, Any]:
    """What an installed package can say about the run; bench/e2e/bench_serve.py adds lscpu's CPU and the commit."""
    import os

    from sparsefast.api import versions

    return {"machine": {"processor": platform.processor(), "nproc": os.cpu_count()}, "versions": versions()}


def run(args: argparse.Namespace, metadata: dict[str, Any] | None = None) -> int:
    from sparsefast.checkpoint import check_output_file, write_json
    from sparsefast.serve.benchmark import Variant

    variants = [Variant.parse(s) for s in args.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must be unique, got {names}")
    for role in ("baseline", "peer"):
        if getattr(args, role) is not None and getattr(args, role) not in names:
            raise ValueError(f"--{role} {getattr(args, role)!r} is not a variant name; choose one of {names}")
    levels = _ints(args.concurrency, "--concurrency")
    counts = [max(4, 4 * c) for c in levels] if args.num_prompts is None else _ints(args.num_prompts, "--num-prompts")
    if len(counts) == 1:
        counts = counts * len(levels)
    if len(counts) != len(levels):
        raise ValueError(f"--num-prompts lists {len(counts)} values for {len(levels)} concurrency levels")
    for name in ("prompt_len", "output_len", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.output_len < 2:
        raise ValueError("--output-len must be >= 2: TPOT needs two tokens")
    for path in (args.json, args.plot):
        if path is not None:
            check_output_file(path)
    log_dir = Path(args.log_dir or (Path(args.json).with_suffix("").as_posix() + "-logs" if args.json
                                    else "bench-serve-logs"))
    result = measure(args, variants, levels, dict(zip(levels, counts)), log_dir, metadata or default_metadata())
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    if args.plot is not None:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    failed = [v["name"] for v in result["variants"] if v["error"]]
    for name in failed:
        print(f"variant {name} did not run: {next(v['error'] for v in result['variants'] if v['name'] == name)}")
    return 0


def measure(args: argparse.Namespace, variants: list[Any], levels: list[int], counts: dict[int, int],
            log_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    import transformers

    from sparsefast.data.evaluation import get_eval_text
    from sparsefast.models import resolve_model_source
    from sparsefast.serve.benchmark import run_benchmark

    _, location, gguf = resolve_model_source(args.tokenizer)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(location), trust_remote_code=False,
                                                           **({"gguf_file": gguf} if gguf else {}))
    text = get_eval_text("wikitext2")
    max_batch = args.max_batch or max(levels)
    out = run_benchmark(variants, tokenizer=tokenizer, text=text, concurrencies=levels, prompt_len=args.prompt_len,
                        output_len=args.output_len, prompts_per_level=counts, request_rate=args.request_rate,
                        device=args.device, max_batch=max_batch, max_queue=max(64, max(counts.values())),
                        load_timeout=args.load_timeout, log_dir=log_dir, rounds=args.rounds)
    baseline = args.baseline or variants[0].name
    return {
        "what": "serving benchmark: streamed /v1/completions, greedy, fixed prompt/output lengths (vLLM metrics)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
        "settings": {"concurrency": levels, "num_prompts": counts, "prompt_len": args.prompt_len,
                     "output_len": args.output_len, "rounds": args.rounds,
                     "request_rate": str(args.request_rate), "device": args.device,
                     "sparsefast_max_batch": max_batch, "tokenizer": args.tokenizer, "prompt_text": "wikitext2"},
        **out, "baseline": baseline, "peer": args.peer, "ratios": ratios(out, baseline, args.peer, levels),
    }


def ratios(out: dict[str, Any], baseline: str, peer: str | None, levels: list[int]) -> dict[str, Any]:
    """Per level: each variant's median TPOT and output throughput relative to the baseline; the TPOT goal
    (baseline TPOT <= peer TPOT, median and mean) when a peer ran."""
    by_name = {v["name"]: v["levels"] for v in out["variants"]}
    res: dict[str, Any] = {}
    for c in map(str, levels):
        base = by_name.get(baseline, {}).get(c)
        if not base:
            continue
        row: dict[str, Any] = {}
        for name, lv in by_name.items():
            s = lv.get(c)
            if not s or not s["completed"] or name == baseline:
                continue
            row[name] = {"tpot_p50_vs_baseline": _div(s["tpot_ms"]["p50"], base["tpot_ms"]["p50"]),
                         "output_throughput_vs_baseline": _div(s["output_throughput_tok_s"],
                                                               base["output_throughput_tok_s"])}
        p = by_name.get(peer, {}).get(c) if peer else None
        if p and p["completed"]:
            row["goal_baseline_tpot_le_peer"] = {
                "baseline_tpot_p50_ms": base["tpot_ms"]["p50"], "peer_tpot_p50_ms": p["tpot_ms"]["p50"],
                "met_p50": base["tpot_ms"]["p50"] <= p["tpot_ms"]["p50"],
                "met_mean": base["tpot_ms"]["mean"] <= p["tpot_ms"]["mean"]}
        res[c] = row
    first, last = str(levels[0]), str(levels[-1])
    if first != last:
        res["throughput_scaling"] = {name: _div(lv.get(last, {}).get("output_throughput_tok_s"),
                                                lv.get(first, {}).get("output_throughput_tok_s"))
                                     for name, lv in by_name.items()}
    return res


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def plot(result: dict[str, Any], path: str) -> None:
    """Two panels: median TPOT (ms) and output throughput (tok/s) against concurrency, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in result["variants"]:
        levels = sorted(int(c) for c, s in v["levels"].items() if s["completed"])
        if not levels:
            continue
        ax1.plot(levels, [v["levels"][str(c)]["tpot_ms"]["p50"] for c in levels], marker="o", label=v["name"])
        ax2.plot(levels, [v["levels"][str(c)]["output_throughput_tok_s"] for c in levels], marker="o",
                 label=v["name"])
    s = result["settings"]
    for ax, title, unit in ((ax1, "TPOT (median)", "ms / token"), (ax2, "output throughput", "tokens / s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    cpu = result["machine"].get("Model name") or result["machine"].get("processor") or "?"
    fig.suptitle(f"{cpu}, {s['device']}: prompt {s['prompt_len']} / output {s['output_len']} tokens, greedy",
                 fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
