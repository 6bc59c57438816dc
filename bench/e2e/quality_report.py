"""The README table and plot of a mask-pruning quality JSON written by bench/e2e/quality.py.

    python bench/e2e/quality_report.py bench/results/<date>-cpu-smollm2-quality.json [--png PATH]

Prints two markdown tables: WikiText-2 perplexity with one row per pattern (unstructured at each sparsity, then the
N:M patterns) and one column per method as measured (magnitude, wanda, sparsegpt, ria, each with +owl / +dsnot where
run; "–" where a combination was not run), and the prune times (calibration forward incl. OWL's extra pass, and
metric+mask) of every run. Writes a PNG (matplotlib) of perplexity against sparsity per method (log scale; N:M
patterns drawn at their sparsity with their own markers) next to the JSON unless --png says where.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsefast.bench.results import save_figure


def pattern_key(run: dict) -> tuple:
    """Unstructured rows first, by sparsity, then N:M rows by name."""
    return (run["pattern"] != "unstructured", run["sparsity"], run["pattern"])


def row_label(run: dict) -> str:
    return f"{run['sparsity']:.0%} unstructured" if run["pattern"] == "unstructured" else run["pattern"]


def method_order(runs: list[dict]) -> list[str]:
    """Methods in the order they were first measured (the JSON keeps measurement order)."""
    return list(dict.fromkeys(r["method"] for r in runs))


def markdown_tables(result: dict) -> str:
    runs = [r for r in result["runs"] if r["method"] != "dense"]
    dense = next((r for r in result["runs"] if r["method"] == "dense"), None)
    methods = method_order(runs)
    rows = sorted({(pattern_key(r), row_label(r)) for r in runs})
    lines = [f"dense: {dense['wikitext2_ppl']:.2f}" if dense else "dense: not measured", "",
             "| pattern | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    by = {(row_label(r), r["method"]): r for r in runs}
    for _, label in rows:
        cells = [f"{by[label, m]['wikitext2_ppl']:.2f}" if (label, m) in by else "–" for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| method | pattern | achieved sparsity | calibration forward s (+ OWL pass) | metric+mask s |",
              "|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (pattern_key(r), methods.index(r["method"]))):
        owl = f" (+ {r['owl_outlier_pass_s']:.0f})" if r.get("owl_outlier_pass_s") else ""
        lines.append(f"| {r['method']} | {row_label(r)} | {r['achieved_sparsity']:.4f} | "
                     f"{r['calib_forward_s']:.0f}{owl} | {r['metric_mask_s']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["method"] != "dense"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, method in enumerate(method_order(runs)):
        color = f"C{i % 10}"
        mine = [r for r in runs if r["method"] == method]
        unstructured = sorted((r["sparsity"], r["wikitext2_ppl"]) for r in mine if r["pattern"] == "unstructured")
        if unstructured:
            ax.plot(*zip(*unstructured), marker="o", color=color, label=method)
        for r in mine:
            if r["pattern"] != "unstructured":
                ax.scatter([r["sparsity"]], [r["wikitext2_ppl"]], marker="s", color=color,
                           label=None if unstructured else method)
                ax.annotate(r["pattern"], (r["sparsity"], r["wikitext2_ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    dense = next((r for r in result["runs"] if r["method"] == "dense"), None)
    if dense:
        ax.axhline(dense["wikitext2_ppl"], color="#555555", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of every prunable linear (squares: N:M patterns)")
    ax.set_ylabel("WikiText-2 perplexity (gptq protocol, log scale)")
    cal = result["calibration"]
    ax.set_title(f"{Path(result['model']).name}: one-shot mask pruning, C4 {cal['nsamples']} x {cal['seqlen']}",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a results JSON of bench/e2e/quality.py")
    p.add_argument("--png", default=None, help="plot path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    src = Path(args.json)
    if not src.is_file():
        p.error(f"{src} does not exist; run bench/e2e/quality.py first")
    result = json.loads(src.read_text())
    if not any(r["method"] != "dense" for r in result.get("runs", [])):
        p.error(f"{src} holds no pruned run yet")
    print(markdown_tables(result))
    print(f"wrote {plot(result, Path(args.png) if args.png else src.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
