"""Recovery training data: Alpaca-format instruction records or plain text, validated and tokenised.

Alpaca records (Taori et al., 2023, "Stanford Alpaca") are objects with string fields ``instruction``,
``output`` and an optional ``input``, in a JSON array (``.json``) or one per line (``.jsonl``). Plain text is a
``.txt`` file, or records with a ``text`` field. ``"alpaca"`` names the shared 2000-record file
``alpaca/alpaca_data_cleaned_archive.json`` (found through ``sparsefast.data.find_data_file``).

Instruction samples are ``prompt + output + EOS`` with the Alpaca prompt template; the loss is taken on the
response only (``output`` and EOS; prompt labels are -100), like alpaca-lora's ``train_on_inputs=False``, so
the model is not trained to reproduce instructions. Plain text is concatenated (EOS between documents) and cut
into ``cutoff_len`` windows with the loss on every token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

ALPACA_FILE = "alpaca/alpaca_data_cleaned_archive.json"
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one record."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class RecoveryData:
    """Validated records: ``kind`` is ``"alpaca"`` (dicts with instruction/input/output) or ``"text"`` (str)."""

    kind: str
    records: list
    source: str
    skipped_empty_output: list[str] = field(default_factory=list)  # where each skipped record was


def _read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs; ``where`` names the line (.jsonl) or the record index (.json array)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [(f"{path}", text)] if text.strip() else []
    if path.suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); one JSON object per line") from None
        return out
    if path.suffix == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records, got a {type(data).__name__}")
        return [(f"{path} record {i}", r) for i, r in enumerate(data)]
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .json, .jsonl (Alpaca or 'text' "
                     "records) or .txt (plain text)")


def _check_str(where: str, rec: dict, field: str, *, required: bool, nonempty: bool) -> str:
    if field not in rec or rec[field] is None:
        if required:
            raise ValueError(f"{where}: field {field!r} is missing (Alpaca records need instruction and output)")
        return ""
    value = rec[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def load_recovery_data(source: str, *, data_dir: str | None = None, max_samples: int | None = None) -> RecoveryData:
    """Read and validate ``source`` ("alpaca" or a .json/.jsonl/.txt path); keep the first ``max_samples`` records.

    Raises FileNotFoundError for a missing file and ValueError naming the line/record and field of the first
    malformed record (every record is checked, not only the kept ones), an empty file, or a file whose records all
    have an empty ``output``. Records with an empty ``output`` are skipped and listed in ``skipped_empty_output``.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {max_samples}")
    if source == "alpaca":
        from sparsefast.data.files import find_data_file

        path = Path(find_data_file(ALPACA_FILE, data_dir))
    else:
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise FileNotFoundError(f"recovery data {source!r} not found; pass 'alpaca' or a .json/.jsonl/.txt file")
    pairs = _read_records(path)
    if not pairs:
        raise ValueError(f"{path}: no records (the file is empty)")
    first = pairs[0][1]
    kind = "text" if isinstance(first, str) or (isinstance(first, dict) and "text" in first
                                                and "instruction" not in first) else "alpaca"
    records: list = []
    skipped: list[str] = []
    for where, rec in pairs:
        if isinstance(rec, str):
            records.append(rec)
            continue
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        if kind == "text":
            records.append(_check_str(where, rec, "text", required=True, nonempty=True))
            continue
        checked = {"instruction": _check_str(where, rec, "instruction", required=True, nonempty=True),
                   "input": _check_str(where, rec, "input", required=False, nonempty=False),
                   "output": _check_str(where, rec, "output", required=True, nonempty=False)}
        if checked["output"].strip():
            records.append(checked)
        else:  # nothing to learn from (the shared Alpaca file has 4 such records): skipped and reported
            skipped.append(where)
    if not records:
        raise ValueError(f"{path}: every record has an empty 'output' field (first: {skipped[0]}); nothing to train on")
    return RecoveryData(kind, records[:max_samples] if max_samples is not None else records, str(path), skipped)


def tokenize_recovery_data(data: RecoveryData, tokenizer, cutoff_len: int) -> tuple[list[dict], int]:
    """Token samples ``{"input_ids": list[int], "labels": list[int]}`` (labels -100 where no loss is taken) and
    the number of instruction records dropped because their prompt alone fills ``cutoff_len``."""
    if cutoff_len < 2:
        raise ValueError(f"--cutoff-len must be >= 2, got {cutoff_len}")
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    samples, dropped = [], 0
    if data.kind == "text":
        stream: list[int] = []
        for doc in data.records:
            stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + tail
        for start in range(0, len(stream), cutoff_len):
            ids = stream[start:start + cutoff_len]
            if len(ids) >= 2:
                samples.append({"input_ids": ids, "labels": list(ids)})
    else:
        for rec in data.records:
            prompt = tokenizer(alpaca_prompt(rec["instruction"], rec["input"]))["input_ids"]
            response = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + tail
            if len(prompt) >= cutoff_len:
                dropped += 1
                continue
            ids = (prompt + response)[:cutoff_len]
            samples.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):]})
    if not samples:
        raise ValueError(f"{data.source}: no training tokens left after tokenising with --cutoff-len {cutoff_len} "
                         f"({dropped} prompts longer than it); raise --cutoff-len")
    return samples, dropped


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids/attention_mask/labels ``[B, T]`` int64 (labels -100 on padding)."""
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        attention[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
