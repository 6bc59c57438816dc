"""The README table and bar plot of an LLM-Pruner results JSON written by bench/e2e/structured_quality.py.

    python bench/e2e/structured_report.py bench/results/2026-12-02-cpu-smollm2-structured.json [--png PATH]

Prints a markdown table, one row per measured model (dense first, then each importance without and with LoRA):
parameters, MACs per token, WikiText-2 / PTB perplexity under the gptq and llm-pruner protocols, the 7 zero-shot
tasks (the per-task metric is lm-eval's ``acc_norm`` where its task config defines one, else ``acc``: boolq and
winogrande), the 7-task averages of acc and acc_norm, the retained fraction of the dense acc_norm average, and CPU
decode ms/token: from the JSON's "decode_side_by_side" (dense and the pruned architecture timed alternating in one
run; every pruned row shares that architecture) when it has one, else each row's own measurement. Writes a PNG
(matplotlib) of the retained fraction and of WikiText-2 perplexity per row next to the JSON unless --png says where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsefast.bench.results import save_figure

TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.", "arc_easy": "ARC-e",
               "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


IMPORTANCE_ORDER = ["dense", "random", "l2", "vector", "element1", "element2"]


def ordered_rows(result: dict) -> list[dict]:
    """Dense first, then each importance without and with LoRA, then the uniform rows (prune-structured --uniform)
    the same way (the JSON keeps measurement order)."""
    def key(row: dict) -> tuple:
        imp = row["importance"]
        return (row.get("uniform", False), IMPORTANCE_ORDER.index(imp) if imp in IMPORTANCE_ORDER
                else len(IMPORTANCE_ORDER), imp, row["lora"])
    return sorted(result["rows"], key=key)


def row_name(row: dict) -> str:
    return row["importance"] + (" uniform" if row.get("uniform") else "") + (" + LoRA" if row["lora"] else "")


def retained(row: dict, dense: dict, metric: str = "acc_norm") -> float:
    """Fraction of the dense model's 7-task average that `row` keeps."""
    return row["zeroshot"]["average"][metric] / dense["zeroshot"]["average"][metric]


def decode_ms(row: dict, result: dict) -> float | None:
    """CPU ms/token of `row`: the side-by-side measurement of its architecture when there is one (None for a uniform
    row then: its architecture was not in that run, and its own timing, alone on whatever machine, is no match)."""
    side = result.get("decode_side_by_side")
    if side is None:
        return row["decode_latency_cpu"]["decode_ms_per_token"]
    if row.get("uniform"):
        return None
    return side["dense_ms_per_token"] if row["importance"] == "dense" else side["pruned_ms_per_token"]


def markdown_table(result: dict) -> str:
    rows = ordered_rows(result)
    dense = next(r for r in rows if r["importance"] == "dense")
    tasks = result["settings"]["zeroshot"]["tasks"]
    head = (["model", "params", "MACs/token", "WT2 gptq", "PTB gptq", "WT2 l-p", "PTB l-p"]
            + [TASK_LABELS.get(t, t) for t in tasks] + ["avg acc", "avg acc_norm", "retained", "CPU ms/token"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        g, lp, zs = r["ppl_gptq"], r["ppl_llm-pruner"], r["zeroshot"]
        cells = [row_name(r), f"{r['parameters'] / 1e6:.1f}M", f"{r['macs_per_token'] / 1e6:.1f}M",
                 f"{g['wikitext2']:.2f}", f"{g['ptb']:.2f}",
                 f"{lp['wikitext2']:.2f}", f"{lp['ptb']:.2f}"]
        cells += [f"{zs['tasks'][t]['acc_norm']:.3f}" for t in tasks]
        cells += [f"{zs['average']['acc']:.4f}", f"{zs['average']['acc_norm']:.4f}", f"{100 * retained(r, dense):.1f}%",
                  "–" if decode_ms(r, result) is None else f"{decode_ms(r, result):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered_rows(result)
    dense = next(r for r in rows if r["importance"] == "dense")
    names = [row_name(r) for r in rows]
    colors = ["#555555" if r["importance"] == "dense" else ("#2a7ab9" if r["lora"] else "#9cc3e4") for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    vals = [100 * retained(r, dense) for r in rows]
    a.bar(names, vals, color=colors)
    a.axhline(93.6, color="#c0392b", linestyle="--", linewidth=1, label="LLM-Pruner LLaMA-7B: 93.6%")
    a.set_ylim(min(*vals, 93.6) - 5, max(*vals, 100) + 3)
    a.set_ylabel("% of the dense 7-task acc_norm average")
    a.legend(loc="lower left", fontsize=8)
    b.bar(names, [r["ppl_gptq"]["wikitext2"] for r in rows], color=colors)
    b.set_yscale("log")
    b.set_ylabel("WikiText-2 perplexity (gptq@512, prefix; log scale)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    s = result["settings"]
    fig.suptitle(f"{Path(s['model']).name}: {int(100 * s['ratio'])}% {s['strategy']}-wise structural pruning, "
                 f"without (light) and with (dark) LoRA", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a results JSON of bench/e2e/structured_quality.py")
    p.add_argument("--png", default=None, help="plot path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    src = Path(args.json)
    if not src.is_file():
        p.error(f"{src} does not exist; run bench/e2e/structured_quality.py first")
    result = json.loads(src.read_text())
    if not any(r["importance"] == "dense" for r in result.get("rows", [])):
        p.error(f"{src} has no dense row yet: the retained fractions need it")
    print(markdown_table(result))
    print(f"wrote {plot(result, Path(args.png) if args.png else src.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
