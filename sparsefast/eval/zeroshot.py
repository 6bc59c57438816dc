"""Zero-shot multiple-choice evaluation by log-likelihood, with lm-evaluation-harness's conventions.

For each item and answer choice ``i`` the model scores ``LL_i = sum_t log p(cont_t | context, cont_<t)``
over the continuation tokens. Three metrics per task, the same set from both backends:

* ``acc`` picks ``argmax_i LL_i``;
* ``acc_norm`` picks ``argmax_i LL_i / len(choice_i)`` in *characters* (the answer text without the leading space),
  exactly as lm-eval computes it -- for the tasks whose lm-eval config defines acc_norm (piqa, hellaswag, arc_*,
  openbookqa). boolq and winogrande define only ``acc`` there, and lm-eval's result has no acc_norm for them; both
  backends then report ``acc_norm = acc``, so the 7-task ``acc_norm`` average is one number whatever the backend;
* ``acc_bytes`` picks ``argmax_i LL_i / bytes(choice_i)`` (UTF-8 bytes, lm-eval's optional ``acc_bytes``); it differs
  from ``acc_norm`` only on non-ASCII choices (57 of ~12k rows of the shared data). The lm-eval backend reports it
  as None (lm-eval's task configs do not request it).

Prompts: see :mod:`sparsefast.eval.tasks` (Gao et al., "A framework for few-shot language model evaluation",
lm-evaluation-harness v0.4).

Tokenisation follows lm-eval's HF backend: no BOS/special tokens; trailing spaces of the context move to
the continuation; an empty context is replaced by lm-eval's prefix token (BOS when the tokenizer has one, else EOS);
``enc(context + continuation)`` is split at ``len(enc(context))`` (when ``enc(context)`` is not
a prefix of it -- tokenizers whose pieces span the boundary -- the continuation is encoded on its own); sequences
longer than the model's context keep their last tokens. Requests are sorted by length and scored in right-padded
batches (one forward per request; the log-softmax is taken only at continuation positions, in fp32).

When ``lm_eval`` is importable and no local data directory was asked for, ``backend="auto"`` hands the
whole run to lm-eval-harness (its own data from the HF hub); otherwise the built-in scorer runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsefast.eval.tasks import TASKS, MCExample, check_task_names, load_hf_task, load_local_task

BACKENDS = ("auto", "builtin", "lm_eval")


def select_backend(backend: str = "auto", data_dir: str | None = None) -> str:
    """``builtin`` or ``lm_eval``. ``auto`` picks lm_eval only when it is importable and ``data_dir`` is None
    (an explicit local data directory means: score that data here). Env ``SPARSEFAST_ZEROSHOT_BACKEND`` overrides
    ``auto``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SPARSEFAST_ZEROSHOT_BACKEND", "auto")
    if backend == "auto":
        return "lm_eval" if data_dir is None and importlib.util.find_spec("lm_eval") is not None else "builtin"
    if backend == "lm_eval" and importlib.util.find_spec("lm_eval") is None:
        raise ValueError("backend 'lm_eval' needs lm-evaluation-harness: pip install lm-eval (or use 'builtin')")
    return backend


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HF model splits them (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    # the tokenizer merged across the boundary (e.g. pieces spanning spaces): lm-eval's split would be
    # ill-defined here, so score the separately encoded continuation instead
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def prefix_token_id(tokenizer, fallback: int = 0) -> int:
    """The token lm-eval's HF model puts before an empty context: BOS if the tokenizer has one, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return fallback


def _max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int = 16,
                   max_batch_tokens: int = 8192, device: str | torch.device = "cpu",
                   progress: bool = True) -> list[float]:
    """Summed log-likelihood of each continuation given its context, as float64 Python floats.

    One causal-LM forward per request on ``input_ids[:, :-1]`` of ``context + continuation``
    (``[B, T]`` int64, right-padded, ``B <= batch_size`` and ``B * T <= max_batch_tokens``).
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError("batch_size and max_batch_tokens must be >= 1")
    max_len = _max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []  # (context+continuation ids, left-truncated to max_len + 1; number of continuation tokens)
    for ctx, cont in requests:
        ctx_ids, cont_ids = encode_request(tokenizer, ctx, cont)
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} (after context {ctx[-40:]!r}) encodes to no tokens")
        if not ctx_ids:
            ctx_ids = [prefix_token_id(tokenizer, pad_id)]
        full = (ctx_ids + cont_ids)[-(max_len + 1):]
        encoded.append((full, min(len(cont_ids), len(full) - 1)))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc="loglikelihood", unit="req", disable=not progress)
    start = 0
    while start < len(order):
        width = len(encoded[order[start]][0]) - 1  # longest input in the batch (sorted descending)
        n = max(1, min(batch_size, max_batch_tokens // width, len(order) - start))
        batch = order[start:start + n]
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for row, i in enumerate(batch):
            full = encoded[i][0]
            input_ids[row, : len(full) - 1] = torch.tensor(full[:-1])
            attention[row, : len(full) - 1] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        for row, i in enumerate(batch):
            full, n_cont = encoded[i]
            # input position j predicts token j + 1: the continuation is predicted by the last n_cont inputs
            end = len(full) - 1
            logp = logits[row, end - n_cont: end].float().log_softmax(-1)
            targets = torch.tensor(full[-n_cont:], dtype=torch.long, device=logp.device)
            results[i] = float(logp.gather(-1, targets[:, None]).sum(dtype=torch.float64))
        bar.update(n)
        start += n
    bar.close()
    model.train(was_training)
    return results


METRICS = ("acc", "acc_norm", "acc_bytes")


def score_example(lls: list[float], example: MCExample, *, has_acc_norm: bool = True) -> dict[str, float]:
    """``{"acc", "acc_norm", "acc_bytes"}`` of one item from its per-choice summed log-likelihoods (ties go to the
    first choice, as lm-eval's argmax). ``has_acc_norm=False`` (boolq, winogrande): acc_norm is acc, as lm-eval."""

    def pick(lengths: list[int]) -> float:
        return float(max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i)) == example.gold)

    acc = pick([1] * len(lls))
    return {"acc": acc, "acc_norm": pick([max(len(c), 1) for c in example.choices]) if has_acc_norm else acc,
            "acc_bytes": pick([max(len(c.encode("utf-8")), 1) for c in example.choices])}


def _stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n - 1) variance, as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def load_task(name: str, *, limit: int | None = None, data_dir: str | None = None) -> tuple[list[MCExample], str]:
    """(examples, source) for one task: the local file under ``data_dir`` / $SPARSEFAST_DATA if present,
    else the HF hub dataset when ``datasets`` is installed; FileNotFoundError otherwise."""
    from sparsefast.data.files import find_data_file

    spec = TASKS[name]
    try:
        path = Path(find_data_file(spec.local_file, data_dir))
    except FileNotFoundError as exc:
        if importlib.util.find_spec("datasets") is None:
            raise FileNotFoundError(f"{name}: {exc}; put {spec.local_file} under --data-dir / $SPARSEFAST_DATA, "
                                    "or pip install datasets to read it from the HF hub") from None
        return load_hf_task(name, limit), f"hf:{spec.hf_path}/{spec.hf_name or ''}:{spec.hf_split}"
    return load_local_task(name, path, limit), str(path)


def _evaluate_builtin(model, tokenizer, tasks: list[str], limit, data_dir, device, batch_size,
                      max_batch_tokens, progress) -> dict:
    loaded = {name: load_task(name, limit=limit, data_dir=data_dir) for name in tasks}  # all data errors first
    out: dict = {"backend": "builtin", "limit": limit, "tasks": {}}
    for name, (examples, source) in loaded.items():
        requests = [(c, k) for ex in examples for c, k in zip(ex.contexts, ex.continuations)]
        t0 = time.perf_counter()
        lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                             device=device, progress=progress)
        hits: dict[str, list[float]] = {m: [] for m in METRICS}
        k = 0
        for ex in examples:
            scores = score_example(lls[k: k + len(ex.choices)], ex, has_acc_norm=TASKS[name].has_acc_norm)
            k += len(ex.choices)
            for m in METRICS:
                hits[m].append(scores[m])
        task: dict = {}
        for m in METRICS:
            task[m] = sum(hits[m]) / len(hits[m])
            task[f"{m}_stderr"] = _stderr(hits[m])
        out["tasks"][name] = {**task, "n": len(examples), "requests": len(requests),
                              "seconds": time.perf_counter() - t0, "source": source}
    return out


def _evaluate_lm_eval(model, tokenizer, tasks: list[str], limit, device, batch_size) -> dict:
    """Run lm-evaluation-harness (0-shot) on the in-memory model. boolq and winogrande have no acc_norm there: acc
    stands in, as the builtin backend reports it; acc_bytes is not computed by lm-eval's default configs (None)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit)["results"]
    out: dict = {"backend": "lm_eval", "limit": limit, "tasks": {}}
    for name in tasks:
        r = res[name]
        out["tasks"][name] = {
            "acc": float(r["acc,none"]), "acc_stderr": float(r.get("acc_stderr,none", float("nan"))),
            "acc_norm": float(r.get("acc_norm,none", r["acc,none"])),
            "acc_norm_stderr": float(r.get("acc_norm_stderr,none", r.get("acc_stderr,none", float("nan")))),
            "acc_bytes": None, "acc_bytes_stderr": None, "source": "lm_eval",
        }
    return out


def evaluate_zeroshot(model, tokenizer, tasks: list[str], *, limit: int | None = None, data_dir: str | None = None,
                      device: str | torch.device = "cpu", batch_size: int = 16, max_batch_tokens: int = 8192,
                      backend: str = "auto", progress: bool = True) -> dict:
    """Zero-shot acc and acc_norm of a causal LM on lm-eval multiple-choice tasks.

    Args:
        model: a transformers causal LM (any dtype); moved to ``device``.
        tokenizer: its tokenizer.
        tasks: names from :data:`sparsefast.eval.tasks.TASKS` (boolq, piqa, hellaswag, winogrande, arc_easy,
            arc_challenge, openbookqa).
        limit: score only the first ``limit`` items of each task.
        data_dir: root of the local task files (``boolq/boolq.jsonl`` ...); None: $SPARSEFAST_DATA.
    Returns:
        ``{"backend", "limit", "tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", ...}},
        "average": {"acc", "acc_norm"}, "seconds"}`` -- averages are unweighted means over tasks; see the module
        docstring for what acc_norm is on tasks without length normalisation.
    """
    tasks = check_task_names(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for every item), got {limit}")
    chosen = select_backend(backend, data_dir)
    model.to(device)
    t0 = time.perf_counter()
    if chosen == "lm_eval":
        out = _evaluate_lm_eval(model, tokenizer, tasks, limit, device, batch_size)
    else:
        out = _evaluate_builtin(model, tokenizer, tasks, limit, data_dir, device, batch_size, max_batch_tokens,
                                progress)
    out["average"] = {m: sum(t[m] for t in out["tasks"].values()) / len(tasks) for m in ("acc", "acc_norm")}
    out["seconds"] = time.perf_counter() - t0
    return out
