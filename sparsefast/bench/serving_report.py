"""The serving benchmark as one run (`sparsefast bench serve`, bench/e2e/bench_serve.py): servers side by side, a
result with the raw per-level metrics of every variant (sparsefast.bench.serving) and ratios against a baseline, and a
PNG of TPOT and output throughput against concurrency.

Ratios per concurrency level: each variant's median TPOT and output throughput relative to the baseline variant;
with a peer (the server to beat, e.g. `transformers serve` on the dense model) the TPOT goal baseline <= peer, on the
median and on the mean; across levels, each variant's throughput at the highest level over the lowest. Prompts are
consecutive windows of WikiText-2's test text, tokenized by `tokenizer` (the same text for every variant).

A variant fails when its server did not come up (or died) or any of its requests failed: the result names it under
"failed", and a run in which every variant failed measured nothing, so it writes no JSON and no plot.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

RESULT_WHAT = "serving benchmark: streamed /v1/completions, greedy, fixed prompt/output lengths (vLLM metrics)"


def parse_int_list(text: str, what: str) -> list[int]:
    """"1,8" -> [1, 8]: a comma list of integers >= 1 (`what` names the option in the error)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what} must list integers >= 1, got {text!r}")
    return values


def default_metadata() -> dict[str, Any]:
    """The machine (lscpu), package versions, git commit and load average of this run."""
    from sparsefast.api import versions
    from sparsefast.bench.results import cpu_info, git_commit, load_average

    return {"machine": cpu_info(), "versions": versions(), "git_commit": git_commit(),
            "load_average": load_average()}


def run_serving_benchmark(variant_specs: list[str], *, concurrency: list[int], num_prompts: list[int] | None = None,
                          baseline: str | None = None, peer: str | None = None, rounds: int = 1,
                          prompt_len: int = 128, output_len: int = 64, request_rate: float = float("inf"),
                          tokenizer: str = "smollm2", device: str = "cpu", max_batch: int | None = None,
                          load_timeout: float = 300.0, log_dir: str | None = None, json_path: str | None = None,
                          plot_path: str | None = None, metadata: dict[str, Any] | None = None,
                          overwrite: bool = False) -> dict[str, Any]:
    """Measure the variants ("NAME=KIND:TARGET", see serving.Variant) at each concurrency level (`num_prompts`: one
    count for all levels, one per level, or None: 4 × concurrency, at least 4), write the result to `json_path`
    and the plot to `plot_path` when given and some variant was measured (existing files only with `overwrite`),
    print the variants that failed, and return the result (`failed`: {variant: why}, module docstring). Every
    setting and output path is checked before a server starts; `baseline` defaults to the first variant."""
    from sparsefast.bench.serving import Variant
    from sparsefast.checkpoint import check_output_file, write_json

    variants = [Variant.parse(s) for s in variant_specs]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--variant names must be unique, got {names}")
    for role, name in (("baseline", baseline), ("peer", peer)):
        if name is not None and name not in names:
            raise ValueError(f"--{role} {name!r} is not a variant name; choose one of {names}")
    counts = [max(4, 4 * c) for c in concurrency] if num_prompts is None else list(num_prompts)
    if len(counts) == 1:
        counts = counts * len(concurrency)
    if len(counts) != len(concurrency):
        raise ValueError(f"--num-prompts lists {len(counts)} values for {len(concurrency)} concurrency levels")
    for flag, value in (("--prompt-len", prompt_len), ("--output-len", output_len), ("--rounds", rounds)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1")
    if output_len < 2:
        raise ValueError("--output-len must be >= 2: TPOT needs two tokens")
    for path in (json_path, plot_path):
        if path is not None:
            check_output_file(path, overwrite=overwrite)
    logs = Path(log_dir or (Path(json_path).with_suffix("").as_posix() + "-logs" if json_path else "bench-serve-logs"))
    settings = {"concurrency": concurrency, "num_prompts": dict(zip(concurrency, counts)), "prompt_len": prompt_len,
                "output_len": output_len, "rounds": rounds, "request_rate": str(request_rate), "device": device,
                "sparsefast_max_batch": max_batch or max(concurrency), "tokenizer": tokenizer,
                "prompt_text": "wikitext2"}
    out = _measure(variants, settings, request_rate, load_timeout, logs)
    chosen = baseline or names[0]
    failed = failures(out)
    result = {"what": RESULT_WHAT, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **(metadata or default_metadata()), "settings": settings, **out, "baseline": chosen, "peer": peer,
              "ratios": ratios(out, chosen, peer, concurrency), "failed": failed}
    written = len(failed) < len(variants)  # a run in which every variant failed measured nothing
    if written and json_path is not None:
        print(f"wrote {write_json(json_path, result, overwrite=overwrite)}")
    if written and plot_path is not None:
        plot(result, plot_path, overwrite=overwrite)
        print(f"wrote {plot_path}")
    for name, why in failed.items():
        print(f"variant {name} failed: {why}")
    return result


def failures(out: dict[str, Any]) -> dict[str, str]:
    """{variant: why} for every variant of a run_benchmark result that failed: its server did not come up (or its
    warm-up request failed), or some of its requests failed at a concurrency level."""
    failed = {}
    for v in out["variants"]:
        if v["error"]:
            failed[v["name"]] = v["error"]
            continue
        for c, s in v["levels"].items():
            if s["failed"]:
                errors = f": {', '.join(s['errors'])}" if s["errors"] else ""
                failed[v["name"]] = (f"{s['failed']} of {s['completed'] + s['failed']} requests failed at "
                                     f"concurrency {c}{errors}")
                break
    return failed


def _measure(variants: list[Any], settings: dict[str, Any], request_rate: float, load_timeout: float,
             log_dir: Path) -> dict[str, Any]:
    import transformers

    from sparsefast.bench.serving import run_benchmark
    from sparsefast.data.evaluation import get_eval_text
    from sparsefast.models import resolve_model_source

    _, location, gguf = resolve_model_source(settings["tokenizer"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(location), trust_remote_code=False,
                                                           **({"gguf_file": gguf} if gguf else {}))
    counts = settings["num_prompts"]
    return run_benchmark(variants, tokenizer=tokenizer, text=get_eval_text("wikitext2"),
                         concurrencies=settings["concurrency"], prompt_len=settings["prompt_len"],
                         output_len=settings["output_len"], prompts_per_level=counts, request_rate=request_rate,
                         device=settings["device"], max_batch=settings["sparsefast_max_batch"],
                         max_queue=max(64, max(counts.values())), load_timeout=load_timeout, log_dir=log_dir,
                         rounds=settings["rounds"])


def ratios(out: dict[str, Any], baseline: str, peer: str | None, levels: list[int]) -> dict[str, Any]:
    """Per level: each variant's median TPOT and output throughput relative to the baseline; the TPOT goal
    (baseline TPOT <= peer TPOT, median and mean) when a peer ran; throughput scaling from the first level to the
    last."""
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


def merge_runs(paths: list[str | Path]) -> dict[str, Any]:
    """One result from runs that measured different concurrency levels of the same variants (each level's variants
    were measured side by side within its run), for one plot; the settings and ratios of each run are kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: runs[0][k] for k in ("what", "machine", "versions", "settings")}
    merged["settings"] = {**merged["settings"], "concurrency": sorted({c for r in runs for c in r["settings"]
                                                                        ["concurrency"]})}
    merged["runs"] = [{"file": str(p), "date": r["date"], "git_commit": r["git_commit"], "settings": r["settings"],
                       "ratios": r["ratios"]} for p, r in zip(paths, runs)]
    by_name: dict[str, dict] = {}
    for r in runs:
        for v in r["variants"]:
            entry = by_name.setdefault(v["name"], {**v, "levels": {}})
            entry["levels"].update(v["levels"])
    merged["variants"] = list(by_name.values())
    return merged


def plot(result: dict[str, Any], path: str | Path, *, overwrite: bool = True) -> None:
    """Two panels: median TPOT (ms) and output throughput (tok/s) against concurrency, one line per variant. Written
    beside `path` first, then published in one step (checkpoint.publish_file: no replace without `overwrite`)."""
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
    from sparsefast.bench.results import save_figure

    save_figure(fig, path, overwrite=overwrite)
