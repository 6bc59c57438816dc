"""Zero-shot evaluation by log-likelihood, with lm-evaluation-harness's conventions.

For each item and answer choice ``i`` the model scores ``LL_i = sum_t log p(cont_t | context, cont_<t)``
over the continuation tokens. Three metrics per multiple-choice task, the same set from both backends:

* ``acc`` picks ``argmax_i LL_i``;
* ``acc_norm`` picks ``argmax_i LL_i / len(choice_i)`` in *characters* (the answer text without the leading space),
  exactly as lm-eval computes it -- for the tasks whose lm-eval config defines acc_norm (piqa, hellaswag, arc_*,
  openbookqa). boolq and winogrande define only ``acc`` there, and lm-eval's result has no acc_norm for them; both
  backends then report ``acc_norm = acc``, so the 7-task ``acc_norm`` average is one number whatever the backend;
* ``acc_bytes`` picks ``argmax_i LL_i / bytes(choice_i)`` (UTF-8 bytes, lm-eval's optional ``acc_bytes``); it differs
  from ``acc_norm`` only on non-ASCII choices (57 of ~12k rows of the shared data). The lm-eval backend reports it
  as None (lm-eval's task configs do not request it).

A loglikelihood task (LAMBADA) has one continuation per item: ``acc`` is 1 where greedy decoding produces all of its
tokens (lm-eval's ``is_greedy``), acc_norm and acc_bytes equal acc, and ``perplexity`` is ``exp(-mean LL)``.

Prompts: see :mod:`sparsefast.eval.tasks` (Gao et al., "A framework for few-shot language model evaluation",
lm-evaluation-harness v0.4).

Tokenisation follows lm-eval's HF backend: no BOS/special tokens; trailing spaces of the context move to
the continuation; an empty context is replaced by lm-eval's prefix token (BOS when the tokenizer has one, else EOS);
``enc(context + continuation)`` is split at ``len(enc(context))`` (when ``enc(context)`` is not
a prefix of it -- tokenizers whose pieces span the boundary -- the continuation is encoded on its own); sequences
longer than the model's context keep their last tokens. The token ids go to a scorer: :class:`ModelScorer` (the model
in this process: requests sorted by length, right-padded batches, one forward per request, the log-softmax taken
only at continuation positions, in fp32) or :class:`sparsefast.eval.server.ServerScorer` (a served model's prompt
logprobs over OpenAI's /v1/completions, as lm-eval's local-completions asks for them). Everything else -- the
prompts, the tokenization, the metrics -- is one code path (:func:`score_tasks`), so a served model is scored as a
local one is.

When ``lm_eval`` is importable and no local data directory was asked for, ``backend="auto"`` hands the
whole run to lm-eval-harness (its own data from the HF hub); otherwise the built-in scorer runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from sparsefast.eval.tasks import TASKS, Example, MCExample, check_task_names, load_hf_task, load_local_task

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


class Loglikelihood(NamedTuple):
    """A continuation's summed log-probability given its context, and whether greedy decoding (argmax at every
    continuation position) produces it: lm-eval's ``(logprob, is_greedy)``."""

    logprob: float
    is_greedy: bool


class LoglikelihoodScorer(Protocol):
    """Where the log-probabilities come from: the model in this process (:class:`ModelScorer`) or a served model
    (:class:`sparsefast.eval.server.ServerScorer`). Both score the same token ids, so results agree within the
    float32 arithmetic of the two forwards."""

    max_tokens: int  # the longest token sequence (context + continuation) one score covers

    def score(self, sequences: list[tuple[list[int], int]], progress: bool) -> list[Loglikelihood]:
        """For each ``(ids, n)``: the Loglikelihood of ``ids[-n:]`` given ``ids[:-n]`` (``0 < n < len(ids)``)."""
        ...


class ModelScorer:
    """The causal LM in this process: one forward per sequence on ``ids[:-1]`` (``[B, T]`` int64, right-padded,
    ``B <= batch_size`` and ``B * T <= max_batch_tokens``, longest first); the log-softmax is taken only at
    continuation positions, in fp32."""

    def __init__(self, model, *, batch_size: int = 16, max_batch_tokens: int = 8192,
                 device: str | torch.device = "cpu", pad_id: int = 0) -> None:
        if batch_size < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size and max_batch_tokens must be >= 1")
        self.model, self.batch_size, self.max_batch_tokens = model, batch_size, max_batch_tokens
        self.device, self.pad_id = device, pad_id
        self.max_tokens = _max_length(model) + 1  # the forward sees all but the last token

    @torch.no_grad()
    def score(self, sequences: list[tuple[list[int], int]], progress: bool = True) -> list[Loglikelihood]:
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[Loglikelihood] = [Loglikelihood(0.0, False)] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(order), desc="loglikelihood", unit="req", disable=not progress)
        start = 0
        while start < len(order):
            width = len(sequences[order[start]][0]) - 1  # longest input in the batch (sorted descending)
            n = max(1, min(self.batch_size, self.max_batch_tokens // width, len(order) - start))
            batch = order[start:start + n]
            input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((n, width), dtype=torch.long)
            for row, i in enumerate(batch):
                full = sequences[i][0]
                input_ids[row, : len(full) - 1] = torch.tensor(full[:-1])
                attention[row, : len(full) - 1] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
            for row, i in enumerate(batch):
                full, n_cont = sequences[i]
                # input position j predicts token j + 1: the continuation is predicted by the last n_cont inputs
                end = len(full) - 1
                logp = logits[row, end - n_cont: end].float().log_softmax(-1)
                targets = torch.tensor(full[-n_cont:], dtype=torch.long, device=logp.device)
                results[i] = Loglikelihood(float(logp.gather(-1, targets[:, None]).sum(dtype=torch.float64)),
                                           bool((logp.argmax(-1) == targets).all()))
            bar.update(n)
            start += n
        bar.close()
        self.model.train(was_training)
        return results


def encode_requests(tokenizer, requests: list[tuple[str, str]], max_tokens: int) -> list[tuple[list[int], int]]:
    """``(ids, n)`` per ``(context, continuation)``: ids = context + continuation tokens (lm-eval's split,
    :func:`encode_request`; an empty context becomes the prefix token), keeping the last ``max_tokens``; n = the
    continuation tokens that remain scored."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for ctx, cont in requests:
        ctx_ids, cont_ids = encode_request(tokenizer, ctx, cont)
        if not cont_ids:
            raise ValueError(f"continuation {cont!r} (after context {ctx[-40:]!r}) encodes to no tokens")
        if not ctx_ids:
            ctx_ids = [prefix_token_id(tokenizer, pad_id)]
        full = (ctx_ids + cont_ids)[-max_tokens:]
        encoded.append((full, min(len(cont_ids), len(full) - 1)))
    return encoded


def loglikelihoods(scorer: LoglikelihoodScorer, tokenizer, requests: list[tuple[str, str]], *,
                   progress: bool = True) -> list[Loglikelihood]:
    """Loglikelihood of each continuation given its context (float64 sums), tokenized here with ``tokenizer`` and
    scored by ``scorer`` (this process's model or a server): the one path both take."""
    return scorer.score(encode_requests(tokenizer, requests, scorer.max_tokens), progress)


METRICS = ("acc", "acc_norm", "acc_bytes")


def pick_choices(lls: list[float], example: MCExample, *, has_acc_norm: bool = True) -> dict[str, int]:
    """The choice index each metric picks from the per-choice summed log-likelihoods (ties go to the first choice,
    as lm-eval's argmax): ``acc`` the largest LL, ``acc_norm`` the largest LL per character of the answer, ``acc_bytes``
    per UTF-8 byte. ``has_acc_norm=False`` (boolq, winogrande): acc_norm picks what acc picks, as lm-eval reports."""

    def pick(lengths: list[int]) -> int:
        return max(range(len(lls)), key=lambda i: (lls[i] / lengths[i], -i))

    acc = pick([1] * len(lls))
    return {"acc": acc, "acc_norm": pick([max(len(c), 1) for c in example.choices]) if has_acc_norm else acc,
            "acc_bytes": pick([max(len(c.encode("utf-8")), 1) for c in example.choices])}


def score_example(lls: list[float], example: MCExample, *, has_acc_norm: bool = True) -> dict[str, float]:
    """``{"acc", "acc_norm", "acc_bytes"}`` of one item: 1.0 where the metric's pick (:func:`pick_choices`) is gold."""
    return {m: float(i == example.gold) for m, i in pick_choices(lls, example, has_acc_norm=has_acc_norm).items()}


def _stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n - 1) variance, as lm-eval reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def load_task(name: str, *, limit: int | None = None, data_dir: str | None = None) -> tuple[list[Example], str]:
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


def _task_requests(examples: list[Example]) -> list[tuple[str, str]]:
    return [r for ex in examples for r in (zip(ex.contexts, ex.continuations) if isinstance(ex, MCExample)
                                           else [(ex.context, ex.continuation)])]


def _score_items(name: str, examples: list[Example], lls: list[Loglikelihood]) -> list[dict]:
    """One record per item: its metrics (0/1), what each metric picked and the log-likelihoods behind it."""
    spec, items, k = TASKS[name], [], 0
    for doc_id, ex in enumerate(examples):
        if isinstance(ex, MCExample):
            values = [ll.logprob for ll in lls[k: k + len(ex.choices)]]
            picks = pick_choices(values, ex, has_acc_norm=spec.has_acc_norm)
            items.append({"doc_id": doc_id, "gold": ex.gold, "loglikelihoods": values, "pred": picks,
                          **{m: float(i == ex.gold) for m, i in picks.items()}})
            k += len(ex.choices)
        else:  # loglikelihood task: acc is greedy-match; no length normalisation, so every metric is acc
            ll = lls[k]
            items.append({"doc_id": doc_id, "loglikelihood": ll.logprob, "is_greedy": ll.is_greedy,
                          **{m: float(ll.is_greedy) for m in METRICS}})
            k += 1
    return items


def score_tasks(scorer: LoglikelihoodScorer, tokenizer, tasks: list[str], *, limit: int | None = None,
                data_dir: str | None = None, progress: bool = True, samples: bool = False) -> dict:
    """The builtin zero-shot evaluation with any scorer: every task's data is read first (errors before work), its
    requests tokenized with ``tokenizer`` and scored, each item scored by :func:`_score_items`. ``samples``: each
    task's result keeps its per-item records under "samples". Returns ``{"backend": "builtin", "limit", "tasks"}``."""
    loaded = {name: load_task(name, limit=limit, data_dir=data_dir) for name in tasks}  # all data errors first
    out: dict = {"backend": "builtin", "limit": limit, "tasks": {}}
    for name, (examples, source) in loaded.items():
        requests = _task_requests(examples)
        t0 = time.perf_counter()
        items = _score_items(name, examples, loglikelihoods(scorer, tokenizer, requests, progress=progress))
        task: dict = {}
        for m in METRICS:
            hits = [item[m] for item in items]
            task[m] = sum(hits) / len(hits)
            task[f"{m}_stderr"] = _stderr(hits)
        if TASKS[name].output_type == "loglikelihood":  # lm-eval's "perplexity" aggregation
            task["perplexity"] = math.exp(-sum(item["loglikelihood"] for item in items) / len(items))
        out["tasks"][name] = {**task, "n": len(examples), "requests": len(requests),
                              "seconds": time.perf_counter() - t0, "source": source,
                              **({"samples": items} if samples else {})}
    out["average"] = _average(out["tasks"])
    return out


def _average(results: dict[str, dict]) -> dict[str, float]:
    """Unweighted means over tasks of acc and acc_norm."""
    return {m: sum(t[m] for t in results.values()) / len(results) for m in ("acc", "acc_norm")}


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
            **({"perplexity": float(r["perplexity,none"])} if "perplexity,none" in r else {}),
        }
    return out


def evaluate_zeroshot(model, tokenizer, tasks: list[str], *, limit: int | None = None, data_dir: str | None = None,
                      device: str | torch.device = "cpu", batch_size: int = 16, max_batch_tokens: int = 8192,
                      backend: str = "auto", progress: bool = True, samples: bool = False) -> dict:
    """Zero-shot acc and acc_norm of a causal LM on lm-eval multiple-choice tasks.

    Args:
        model: a transformers causal LM (any dtype); moved to ``device``.
        tokenizer: its tokenizer.
        tasks: names from :data:`sparsefast.eval.tasks.TASKS` (boolq, piqa, hellaswag, winogrande, arc_easy,
            arc_challenge, openbookqa).
        limit: score only the first ``limit`` items of each task.
        data_dir: root of the local task files (``boolq/boolq.jsonl`` ...); None: $SPARSEFAST_DATA.
        samples: keep each task's per-item records (builtin backend; :func:`score_tasks`).
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
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        scorer = ModelScorer(model, batch_size=batch_size, max_batch_tokens=max_batch_tokens, device=device,
                             pad_id=pad_id)
        out = score_tasks(scorer, tokenizer, tasks, limit=limit, data_dir=data_dir, progress=progress,
                          samples=samples)
    out["average"] = _average(out["tasks"])
    out["seconds"] = time.perf_counter() - t0
    return out
