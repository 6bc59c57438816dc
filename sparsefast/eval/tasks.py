"""Zero-shot tasks: data adapters that rebuild lm-evaluation-harness's prompts.

A multiple-choice task (lm-eval's ``output_type: multiple_choice``) turns one dataset row into an :class:`MCExample`:
for each answer choice ``i`` one log-likelihood request ``(contexts[i], continuations[i])`` and the text whose length
normalises ``acc_norm`` (characters) and ``acc_bytes`` (UTF-8 bytes). A loglikelihood task (``output_type:
loglikelihood``: LAMBADA) turns a row into one :class:`ContinuationExample`, scored by whether greedy decoding produces
the continuation. The strings are the ones lm-eval (v0.4 task YAMLs) scores, zero-shot, with its default target
delimiter ``" "``:

=============  ======================================================  ==========================
task           context                                                 continuation
=============  ======================================================  ==========================
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer:``         ``" no"`` / ``" yes"``
piqa           ``Question: {goal}\\nAnswer:``                          ``" {sol}"``
hellaswag      ``preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()})``  ``" " + preprocess(ending)``
winogrande     ``sentence[:blank] + option`` (one context per option)  ``" " + sentence[blank+1:].strip()``
arc_*          ``Question: {question}\\nAnswer:``                      ``" {choice}"``
openbookqa     ``{question_stem}``                                     ``" {choice}"``
lambada_openai ``text`` without its last ``" "``-separated word        ``" " + that word``
=============  ======================================================  ==========================

Two row layouts are read: the files in ``shared/data`` (see its SOURCES.md) and the HF hub datasets that
lm-eval downloads. Where the local files differ from lm-eval's source:

* boolq (MosaicML export): passages lack SuperGLUE's ``"{title} -- "`` prefix; it cannot be rebuilt, so
  local BoolQ prompts are shorter than lm-eval's. The question already carries the ``"?"``.
* hellaswag: a 1000-row subset of the 10042-row validation split, in shuffled order, so ``limit=N``
  takes different rows than lm-eval's ``--limit N``.
* arc (MosaicML export): every row has exactly 4 choices; choice texts are as in ai2_arc.
* piqa: the original dev files (``valid.jsonl`` + ``valid-labels.lst``), identical to the HF rows.
* winogrande: MosaicML's ``context_options``/``continuation`` is lm-eval's partial-scoring layout.
* lambada_openai (MosaicML export): ``context`` + ``" "`` + ``continuation`` is the HF row's ``text``; lm-eval's
  split of that text is applied to it (it gives back the file's context and continuation, for all 5153 rows).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: request ``i`` scores ``continuations[i]`` after ``contexts[i]``.

    ``choices[i]`` is the answer text without the target delimiter; ``acc_norm`` divides the summed
    log-likelihood of choice ``i`` by ``len(choices[i])`` (characters), ``acc_bytes`` by its UTF-8 byte count.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        n = len(self.choices)
        if n < 2 or len(self.contexts) != n or len(self.continuations) != n:
            raise ValueError(f"an example needs >= 2 choices with one context/continuation each, got {self}")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} is outside the {n} choices")


@dataclass(frozen=True)
class ContinuationExample:
    """One item of a loglikelihood task: ``continuation`` scored after ``context``; ``acc`` is whether greedy decoding
    produces every continuation token, lm-eval's ``perplexity`` is exp of minus the mean summed log-likelihood."""

    context: str
    continuation: str


Example = MCExample | ContinuationExample


def _same_context(context: str, choices: Iterable[str], gold: int) -> MCExample:
    choices = tuple(choices)
    return MCExample((context,) * len(choices), tuple(" " + c for c in choices), choices, int(gold))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup: WikiHow ``" [title]"`` becomes ``". "``, other ``[...]`` tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# ---- local (shared/data) layouts ---------------------------------------------------------------------

def _boolq_local(row: dict) -> MCExample:
    query = row["query"]
    if not query.startswith("Passage: "):
        raise ValueError("BoolQ query does not start with 'Passage: '")
    return _same_context(query[len("Passage: "):] + "\nAnswer:", row["choices"], row["gold"])


def _mosaic_question(row: dict) -> MCExample:
    return _same_context(row["query"] + "\nAnswer:", row["choices"], row["gold"])


def _openbookqa_local(row: dict) -> MCExample:
    return _same_context(row["query"], row["choices"], row["gold"])


def _winogrande_local(row: dict) -> MCExample:
    options = tuple(row["context_options"])
    cont = " " + row["continuation"].strip()
    return MCExample(options, (cont,) * len(options), (cont[1:],) * len(options), int(row["gold"]))


def _lambada_local(row: dict) -> ContinuationExample:
    return _lambada({"text": row["context"] + " " + row["continuation"]})


# ---- HF hub layouts (the datasets lm-eval downloads) -------------------------------------------------

def _boolq_hf(row: dict) -> MCExample:
    return _same_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ("no", "yes"), row["label"])


def _piqa(row: dict) -> MCExample:
    return _same_context(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), row["label"])


def _hellaswag(row: dict) -> MCExample:
    query = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _same_context(query, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _winogrande_hf(row: dict) -> MCExample:
    sentence = row["sentence"]
    blank = sentence.index("_")
    cont = " " + sentence[blank + 1:].strip()
    options = (sentence[:blank] + row["option1"], sentence[:blank] + row["option2"])
    return MCExample(options, (cont, cont), (cont[1:], cont[1:]), {"1": 0, "2": 1}[str(row["answer"])])


def _arc_hf(row: dict) -> MCExample:
    choices = row["choices"]
    gold = choices["label"].index(row["answerKey"])
    return _same_context(f"Question: {row['question']}\nAnswer:", choices["text"], gold)


def _openbookqa_hf(row: dict) -> MCExample:
    choices = row["choices"]
    return _same_context(row["question_stem"], choices["text"], choices["label"].index(row["answerKey"].strip()))


def _lambada(row: dict) -> ContinuationExample:
    # lm-eval's lambada_openai.yaml: doc_to_text "{{text.split(' ')[:-1]|join(' ')}}", doc_to_target
    # "{{' '+text.split(' ')[-1]}}"
    words = row["text"].split(" ")
    if len(words) < 2:
        raise ValueError("a LAMBADA text needs at least two space-separated words")
    return ContinuationExample(" ".join(words[:-1]), " " + words[-1])


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's rows live locally (relative to the data dir) and on the HF hub, and how to read them."""

    local_file: str
    local_adapter: Callable[[dict], Example]
    hf_path: str
    hf_name: str | None
    hf_split: str
    hf_adapter: Callable[[dict], Example]
    labels_file: str | None = None  # PIQA keeps its labels in a separate .lst file
    has_acc_norm: bool = True  # False where lm-eval's task config reports acc only (boolq, winogrande, lambada)
    output_type: str = "multiple_choice"  # lm-eval's: "multiple_choice" (MCExample) or "loglikelihood"


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq/boolq.jsonl", _boolq_local, "super_glue", "boolq", "validation", _boolq_hf,
                      has_acc_norm=False),
    "piqa": TaskSpec("piqa/valid.jsonl", _piqa, "baber/piqa", None, "validation", _piqa,
                     labels_file="piqa/valid-labels.lst"),
    "hellaswag": TaskSpec("hellaswag/hellaswag.jsonl", _hellaswag, "Rowan/hellaswag", None, "validation", _hellaswag),
    "winogrande": TaskSpec("winogrande/winogrande.jsonl", _winogrande_local, "winogrande", "winogrande_xl",
                           "validation", _winogrande_hf, has_acc_norm=False),
    "arc_easy": TaskSpec("arc/arc_easy.jsonl", _mosaic_question, "allenai/ai2_arc", "ARC-Easy", "test", _arc_hf),
    "arc_challenge": TaskSpec("arc/arc_challenge.jsonl", _mosaic_question, "allenai/ai2_arc", "ARC-Challenge",
                              "test", _arc_hf),
    "openbookqa": TaskSpec("openbookqa/openbook_qa.jsonl", _openbookqa_local, "allenai/openbookqa", "main", "test",
                           _openbookqa_hf),
    "lambada_openai": TaskSpec("lambada/lambada_openai.jsonl", _lambada_local, "EleutherAI/lambada_openai", "default",
                               "test", _lambada, has_acc_norm=False, output_type="loglikelihood"),
}


def check_task_names(tasks: Iterable[str]) -> list[str]:
    """Return ``tasks`` as a list, or raise ValueError naming the unknown ones and the known ones."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown zero-shot task(s) {unknown or tasks}; choose from {', '.join(TASKS)}")
    return tasks


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def _adapt(rows: Iterable[dict], adapter: Callable[[dict], Example], where: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows, 1):
        try:
            out.append(adapter(row))
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"{where} row {i}: cannot build the task example ({type(exc).__name__}: {exc})") from None
    return out


def load_local_task(name: str, path: Path, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` from its local file ``path`` (first ``limit`` rows when given)."""
    spec = TASKS[name]
    rows = read_jsonl(path)
    if spec.labels_file is not None:
        labels_path = path.parent / Path(spec.labels_file).name
        labels = [int(x) for x in labels_path.read_text(encoding="utf-8").split()]
        if len(labels) != len(rows):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(rows)} rows in {path}")
        rows = [dict(r, label=lab) for r, lab in zip(rows, labels)]
    return _adapt(rows[:limit] if limit is not None else rows, spec.local_adapter, str(path))


def load_hf_task(name: str, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` from the HF hub dataset lm-eval uses (needs ``datasets`` and network)."""
    import datasets

    spec = TASKS[name]
    ds = datasets.load_dataset(spec.hf_path, spec.hf_name, split=spec.hf_split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _adapt(ds, spec.hf_adapter, f"{spec.hf_path}/{spec.hf_name or ''}:{spec.hf_split}")
