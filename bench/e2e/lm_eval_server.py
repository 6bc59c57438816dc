"""A served model is scored as lm-eval-harness scores it (issue 21's acceptance): four scorers, item for item.

On the same fp32 weights and the same items of loglikelihood tasks (arc_easy, piqa, lambada_openai over the shared
local data, through the task YAMLs in bench/e2e/lm_eval_tasks/):
  1. lm-eval 0.4.13 `--model local-completions` (default batched requests: `batch_size` token-id prompts per request,
     tokenized with the model's HF tokenizer) against `sparsefast serve MODEL --dtype float32`;
  2. `sparsefast eval MODEL --tasks ... --server URL` against the same server;
  3. lm-eval 0.4.13 `--model hf` on the HF checkpoint of the same weights (fp32);
  4. `sparsefast eval MODEL --tasks ...` with the model loaded locally.
Each logs its items (lm-eval's --log_samples, sparsefast's --log-samples); per document the picks (the answer with
the largest log-likelihood, and per character for acc_norm; for LAMBADA, whether greedy decoding gives the last word)
and acc / acc_norm are compared. Writes bench/results/YYYY-MM-DD-cpu-lm-eval-server-<model>.json (versions, commit,
machine, load average, per-task accuracies from each scorer, the items that differ, the largest log-likelihood
differences) with an exclusive atomic write (--overwrite replaces); exits 1 if a scorer measured nothing or the four
disagree on an item.

Tokenizers whose pieces span the context/continuation boundary (SentencePiece's "▁about▁": the tiny story llama's,
every item) are split differently on purpose: lm-eval scores enc(context + continuation)[len(enc(context)):],
sparsefast the separately encoded continuation (sparsefast.eval.zeroshot.encode_request), so there the two lm-eval
scorers agree with each other, the two sparsefast ones with each other, and the pairs differ; the result lists those
docs ("boundary_merged_doc_ids"). SmolLM2's BPE tokenizer has none in the first 400 items of each task.

BOS: lm-eval 0.4.13's hf model adds the tokenizer's default special tokens (a Llama tokenizer's BOS) while its
local-completions model and sparsefast add none; every lm-eval run here gets add_bos_token=False, so all four score
the same ids (SmolLM2's tokenizer adds no BOS either way).

    bash bench/peers/lm_eval.sh ../peers/lm-eval
    python bench/e2e/lm_eval_server.py smollm2 --lm-eval-venv ../peers/lm-eval --data-dir ../shared/data --limit 200
    python bench/e2e/lm_eval_server.py ../shared/models/learninglm-story-llama --lm-eval-venv ../peers/lm-eval \\
        --data-dir ../shared/data --limit 20 --results-dir /tmp

MODEL is what `sparsefast serve` and `sparsefast eval` load; lm-eval's hf model and local-completions' tokenizer read
--hf-dir (default: MODEL when it is an HF checkpoint directory, else MODEL saved with save_pretrained at fp32 into the
work directory, e.g. the dequantized GGUF of `smollm2`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
LM_EVAL_VERSION = "0.4.13"
SCORERS = ("lm_eval_server", "sparsefast_server", "lm_eval_hf", "sparsefast_local")
REFERENCE = "sparsefast_local"
BATCH = 8  # prompts per completions request (lm-eval's batch_size) = sparsefast serve's --max-batch


def lm_eval_task(task: str) -> str:
    """The name a task has in bench/e2e/lm_eval_tasks (not lm-eval's own, which reads its data from the HF hub)."""
    return f"sparsefast_{task}"


def write_task_yamls(tasks: list[str], data_dir: Path, work_dir: Path) -> Path:
    """The task YAMLs with @DATA_DIR@ / @WORK_DIR@ filled in, in work_dir/tasks (lm-eval's --include_path); PIQA's
    labels joined into its rows (work_dir/piqa_valid.jsonl), as lm-eval's HF dataset has them."""
    from sparsefast.eval.tasks import read_jsonl

    out = work_dir / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        text = (TASKS_DIR / f"{task}.yaml").read_text()
        (out / f"{task}.yaml").write_text(text.replace("@DATA_DIR@", str(data_dir)).replace("@WORK_DIR@",
                                                                                             str(work_dir)))
    if "piqa" in tasks:
        rows = read_jsonl(data_dir / "piqa" / "valid.jsonl")
        labels = (data_dir / "piqa" / "valid-labels.lst").read_text().split()
        if len(labels) != len(rows):
            raise ValueError(f"{data_dir / 'piqa'}: {len(labels)} labels for {len(rows)} rows")
        with open(work_dir / "piqa_valid.jsonl", "w", encoding="utf-8") as f:
            for row, label in zip(rows, labels):
                f.write(json.dumps({**row, "label": int(label)}) + "\n")
    return out


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run `cmd` with its output in `log`; seconds it took. RuntimeError with the log's last lines if it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"{cmd[0]} ... exited {rc}; log {log}:\n{tail}")
    return time.perf_counter() - t0


# ---- reading each scorer's items --------------------------------------------------------------------------------
def _floats(resp: Any) -> tuple[float, bool]:
    """(loglikelihood, is_greedy) of one lm-eval response, which its samples files store as values or strings."""
    ll, greedy = resp[0] if isinstance(resp[0], (list, tuple)) else resp
    return float(ll), str(greedy) == "True"


def lm_eval_items(output_dir: Path, task: str) -> tuple[dict[int, dict], dict]:
    """({doc_id: item}, aggregated metrics) of one task from an lm-eval --output_path/--log_samples run. An item:
    {"lls", "pred": {"acc", "acc_norm"}, "acc", "acc_norm"} (multiple choice) or {"ll", "is_greedy", "acc"}."""
    name = lm_eval_task(task)
    samples = sorted(output_dir.rglob(f"samples_{name}_*.jsonl"))
    results = sorted(output_dir.rglob("results_*.json"))
    if not samples or not results:
        raise RuntimeError(f"lm-eval wrote no samples/results for {name} under {output_dir}")
    metrics = json.loads(results[-1].read_text())["results"][name]
    items = {}
    for line in samples[-1].read_text().splitlines():
        s = json.loads(line)
        resps = [_floats(r) for r in s["filtered_resps"]]
        if "acc_norm" not in s:  # loglikelihood task: one response
            items[s["doc_id"]] = {"ll": resps[0][0], "is_greedy": resps[0][1], "acc": float(s["acc"])}
            continue
        args = s["arguments"]  # 0.4.13: {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}
        conts = [a["arg_1"] if isinstance(a, dict) else a[1] for a in (args.values() if isinstance(args, dict)
                                                                         else args)]
        lls = [r[0] for r in resps]
        lengths = [max(len(c[1:] if c.startswith(" ") else c), 1) for c in conts]  # lm-eval: len(choice)
        items[s["doc_id"]] = {"lls": lls, "pred": {"acc": _argmax(lls), "acc_norm": _argmax(
            [v / n for v, n in zip(lls, lengths)])}, "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"])}
    summary = {"acc": metrics.get("acc,none"), "acc_norm": metrics.get("acc_norm,none"),
               "perplexity": metrics.get("perplexity,none"), "n": len(items)}
    return items, summary


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def sparsefast_items(path: Path, task: str) -> tuple[dict[int, dict], dict]:
    """The same shape from a `sparsefast eval --log-samples --json` file."""
    r = json.loads(path.read_text())["zeroshot"]["tasks"][task]
    items = {}
    for s in r["samples"]:
        if "loglikelihoods" in s:
            items[s["doc_id"]] = {"lls": s["loglikelihoods"], "pred": {m: s["pred"][m] for m in ("acc", "acc_norm")},
                                  "acc": s["acc"], "acc_norm": s["acc_norm"]}
        else:
            items[s["doc_id"]] = {"ll": s["loglikelihood"], "is_greedy": s["is_greedy"], "acc": s["acc"]}
    return items, {"acc": r["acc"], "acc_norm": r["acc_norm"] if "loglikelihoods" in r["samples"][0] else None,
                   "perplexity": r.get("perplexity"), "n": len(items)}


def compare(items: dict[str, dict[int, dict]]) -> dict:
    """Item for item against REFERENCE: per scorer the doc ids whose picks or acc / acc_norm (LAMBADA: is_greedy)
    differ and its largest log-likelihood difference; "differing": the union over scorers."""
    ref = items[REFERENCE]
    per_scorer: dict[str, list[int]] = {}
    max_diff: dict[str, float] = {}
    for name, got in items.items():
        differing, worst = set(got) ^ set(ref), 0.0
        for doc_id in set(got) & set(ref):
            a, b = ref[doc_id], got[doc_id]
            decided = ("pred", "acc", "acc_norm") if "lls" in a else ("is_greedy", "acc")
            if any(a.get(k) != b.get(k) for k in decided):
                differing.add(doc_id)
            pairs = zip(a["lls"], b["lls"]) if "lls" in a else [(a["ll"], b["ll"])]
            worst = max([worst, *(abs(x - y) for x, y in pairs)])
        per_scorer[name], max_diff[name] = sorted(differing), worst
    union = sorted(set().union(*per_scorer.values()))
    return {"n": len(ref), "differing": len(union), "differing_doc_ids": union,
            "differing_doc_ids_by_scorer": per_scorer, "max_abs_loglikelihood_diff": max_diff}


def boundary_merged(tokenizer, task: str, data_dir: Path, limit: int) -> list[int]:
    """Doc ids with a request whose enc(context) is not a prefix of enc(context + continuation) (pieces spanning the
    boundary, e.g. SentencePiece's "▁about▁"): lm-eval scores whole[len(enc(context)):] there, sparsefast the
    separately encoded continuation (sparsefast.eval.zeroshot.encode_request), so their numbers differ by design."""
    from sparsefast.eval.zeroshot import _task_requests, load_task

    examples, _ = load_task(task, limit=limit, data_dir=str(data_dir))
    out = []
    for doc_id, ex in enumerate(examples):
        for ctx, cont in _task_requests([ex]):
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = (ctx[:-n], ctx[-n:] + cont) if n else (ctx, cont)
            whole, head = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (ctx + cont, ctx))
            if whole[: len(head)] != head:
                out.append(doc_id)
                break
    return out


# ---- the run ------------------------------------------------------------------------------------------------------
def venv_versions(python: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('lm_eval', 'torch', 'transformers', 'tokenizers', 'datasets')}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot report lm-eval's versions: {out.stderr.strip().splitlines()[-1:]}; "
                           "make the venv with: bash bench/peers/lm_eval.sh VENV")
    return json.loads(out.stdout)


def hf_checkpoint(model: str, hf_dir: str | None, work_dir: Path) -> Path:
    """--hf-dir, else MODEL when it is an HF checkpoint directory, else MODEL saved at fp32 into the work dir."""
    if hf_dir is not None:
        return Path(hf_dir).resolve()
    import torch

    from sparsefast.checkpoint import save_checkpoint
    from sparsefast.models import load_model, resolve_model_source

    kind, location, _ = resolve_model_source(model)
    if kind == "hf_dir":
        return Path(location).resolve()
    out = work_dir / "hf"
    if not (out / "config.json").is_file():
        m, tok = load_model(model, dtype=torch.float32)
        save_checkpoint(m, tok, out)  # a GGUF-dequantized model is saved as the plain float checkpoint it is
    return out


def lm_eval_cmd(python: Path, model: str, model_args: dict[str, Any], tasks: list[str], include: Path, limit: int,
                out: Path, batch_size: int) -> list[str]:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    return [str(python), "-m", "lm_eval", "run", "--model", model, "--model_args", args, "--tasks",
            ",".join(lm_eval_task(t) for t in tasks), "--include_path", str(include), "--limit", str(limit),
            "--batch_size", str(batch_size), "--num_fewshot", "0", "--device", "cpu", "--log_samples",
            "--output_path", str(out)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="what sparsefast serve / eval load: smollm2, a checkpoint dir, a .gguf")
    p.add_argument("--lm-eval-venv", required=True, help="venv made by bench/peers/lm_eval.sh")
    p.add_argument("--data-dir", required=True, help="the shared data (arc/, piqa/, lambada/ ...)")
    p.add_argument("--hf-dir", default=None, help="HF checkpoint of MODEL's weights for lm-eval (default above)")
    p.add_argument("--tasks", default="arc_easy,piqa,lambada_openai", help="comma list (YAMLs in lm_eval_tasks/)")
    p.add_argument("--limit", type=int, required=True, help="first N items of each task (lm-eval's --limit)")
    p.add_argument("--work-dir", default=None, help="logs, lm-eval outputs, the saved checkpoint (default: temp)")
    p.add_argument("--results-dir", default=None,
                   help="where the result JSON goes (default bench/results: <date>-cpu-lm-eval-server-<model>.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result")
    args = p.parse_args()

    from sparsefast.bench.results import result_path, slug, write_result
    from sparsefast.bench.serving import Variant, start_server, stop_server, wait_ready
    from sparsefast.checkpoint import check_output_file
    from sparsefast.cli.eval import _versions

    # everything that needs no work first
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in tasks if not (TASKS_DIR / f"{t}.yaml").is_file()]
    if missing or not tasks:
        p.error(f"no task YAML for {missing or tasks} in {TASKS_DIR}")
    if args.limit < 1:
        p.error("--limit must be >= 1")
    python = Path(args.lm_eval_venv) / "bin" / "python"
    if not python.is_file():
        p.error(f"{python} not found; make the venv with: bash bench/peers/lm_eval.sh {args.lm_eval_venv}")
    peer = venv_versions(python)
    if peer["lm_eval"] != LM_EVAL_VERSION:
        p.error(f"{args.lm_eval_venv} has lm-eval {peer['lm_eval']}, this comparison is for {LM_EVAL_VERSION}")
    data_dir = Path(args.data_dir).resolve()
    name = Path(args.model.rstrip("/")).name if os.sep in args.model else args.model
    what = f"lm-eval-server-{slug(name)}"
    check_output_file(result_path(what, device="cpu", out_dir=args.results_dir), overwrite=args.overwrite)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lm-eval-server-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    include = write_task_yamls(tasks, data_dir, work)
    hf_dir = hf_checkpoint(args.model, args.hf_dir, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets"), "OPENAI_API_KEY": "none"}
    sparsefast_cmd = [sys.executable, "-m", "sparsefast", "eval", args.model, "--tasks", ",".join(tasks), "--limit",
                      str(args.limit), "--data-dir", str(data_dir), "--log-samples", "--no-progress", "--overwrite"]
    seconds: dict[str, float] = {}
    commands: dict[str, list[str]] = {}

    v = Variant(name="served", kind="sparsefast", target=args.model)
    start_server(v, device="cpu", max_batch=BATCH, max_queue=64, log_dir=work, extra_args=["--dtype", "float32"])
    try:
        wait_ready(v, timeout=900)
        if v.error:
            raise RuntimeError(f"sparsefast serve did not start: {v.error}")
        commands["lm_eval_server"] = lm_eval_cmd(
            python, "local-completions", {"model": v.model_id, "base_url": f"{v.base_url}/v1/completions",
                                          "tokenizer": hf_dir, "tokenizer_backend": "huggingface",
                                          "tokenized_requests": True, "add_bos_token": False},
            tasks, include, args.limit, work / "lm_eval_server", BATCH)
        seconds["lm_eval_server"] = run_logged(commands["lm_eval_server"], work / "lm_eval_server.log", env)
        commands["sparsefast_server"] = [*sparsefast_cmd, "--server", v.base_url, "--json",
                                         str(work / "sparsefast_server.json")]
        seconds["sparsefast_server"] = run_logged(commands["sparsefast_server"], work / "sparsefast_server.log")
    finally:
        stop_server(v)
    commands["lm_eval_hf"] = lm_eval_cmd(python, "hf", {"pretrained": hf_dir, "dtype": "float32",
                                                        "add_bos_token": False}, tasks, include, args.limit,
                                         work / "lm_eval_hf", BATCH)
    seconds["lm_eval_hf"] = run_logged(commands["lm_eval_hf"], work / "lm_eval_hf.log", env)
    commands["sparsefast_local"] = [*sparsefast_cmd, "--dtype", "float32", "--json",
                                    str(work / "sparsefast_local.json")]
    seconds["sparsefast_local"] = run_logged(commands["sparsefast_local"], work / "sparsefast_local.log")

    from sparsefast.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    per_task, ok = {}, True
    for task in tasks:
        items, summaries = {}, {}
        for scorer in SCORERS:
            if scorer.startswith("lm_eval"):
                items[scorer], summaries[scorer] = lm_eval_items(work / scorer, task)
            else:
                items[scorer], summaries[scorer] = sparsefast_items(work / f"{scorer}.json", task)
        cmp = compare(items)
        measured = all(s["n"] > 0 for s in summaries.values())
        ok &= measured and cmp["differing"] == 0
        per_task[task] = {"accuracy": summaries, **cmp,
                          "boundary_merged_doc_ids": boundary_merged(tokenizer, task, data_dir, args.limit)}
        accs = "  ".join(f"{s} {summaries[s]['acc']:.4f}" for s in SCORERS)
        print(f"{task:>15s}  n {cmp['n']}  differing {cmp['differing']}  acc: {accs}")
    payload = {"model": args.model, "hf_dir": str(hf_dir), "tasks": tasks, "limit": args.limit,
               "data_dir": str(data_dir), "requests_per_batch": BATCH, "server_dtype": "float32",
               "versions": {"sparsefast_venv": _versions(), "lm_eval_venv": peer}, "seconds": seconds,
               "commands": {k: " ".join(map(str, c)) for k, c in commands.items()}, "agree": ok,
               "results": per_task}
    written = write_result(what, payload, device="cpu", out_dir=args.results_dir, overwrite=args.overwrite)
    print(f"{'agree' if ok else 'DISAGREE'}; wrote {', '.join(map(str, written))} (work dir {work})")
    if args.work_dir is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
