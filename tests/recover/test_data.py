"""sparsefast.recover.data: Alpaca-format and plain-text records validated line by line, the prompt template and
response-only labels, the shared Alpaca file."""

from __future__ import annotations

import pytest

from sparsefast.recover import alpaca_prompt, load_recovery_data, tokenize_recovery_data
from tests.recover.helpers import ALPACA, FIX, load_story


@pytest.fixture()
def story(story_llama_dir):
    return load_story(story_llama_dir)


def test_alpaca_template_and_response_only_labels(story):
    _, tok = story
    data = load_recovery_data(str(ALPACA))
    assert data.kind == "alpaca" and len(data.records) == 8 and data.records[6]["input"] == ""
    samples, dropped = tokenize_recovery_data(data, tok, cutoff_len=256)
    assert dropped == 0 and len(samples) == 8
    rec, s = data.records[1], samples[1]
    prompt = tok(alpaca_prompt(rec["instruction"], rec["input"]))["input_ids"]
    assert "### Input:\n" + rec["input"] in alpaca_prompt(rec["instruction"], rec["input"])
    assert s["labels"][: len(prompt)] == [-100] * len(prompt)  # no loss on the prompt
    assert s["labels"][len(prompt):] == s["input_ids"][len(prompt):] == (
        tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    short, dropped = tokenize_recovery_data(data, tok, cutoff_len=len(prompt) + 3)
    assert max(len(x["input_ids"]) for x in short) <= len(prompt) + 3
    text = load_recovery_data(str(FIX / "plain.txt"))
    windows, _ = tokenize_recovery_data(text, tok, cutoff_len=16)
    assert text.kind == "text" and all(w["labels"] == w["input_ids"] and len(w["input_ids"]) <= 16 for w in windows)


@pytest.mark.parametrize("name,content,match", [
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
     r"a.jsonl:3: field 'output' is missing"),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "y"\n',
     r"a.jsonl:2: not valid JSON"),
    ("a.json", '[{"instruction": "x", "output": "y"}, {"instruction": "x", "input": 3, "output": "y"}]',
     r"record 1: field 'input' must be a string"),
    ("a.json", '[{"instruction": "  ", "output": "y"}]', r"record 0: field 'instruction' is empty"),
    ("a.json", '{"instruction": "x", "output": "y"}', "expected a JSON array"),
    ("a.json", "", "no records"),
    ("a.jsonl", "\n\n", "no records"),
    ("a.jsonl", '{"instruction": "x", "output": ""}\n{"instruction": "y", "output": " "}\n',
     r"every record has an empty 'output' field \(first: .*a.jsonl:1\)"),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n[1, 2]\n', r"a.jsonl:2: expected a JSON object"),
    ("a.jsonl", '{"text": "hello"}\n{"text": ""}\n', r"a.jsonl:2: field 'text' is empty"),
    ("a.csv", "instruction,output\n", "unsupported data file type"),
])
def test_bad_recovery_data(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_recovery_data(str(path))


def test_empty_outputs_are_skipped_and_counted(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "x", "output": "y"}, {"instruction": "z", "input": "w", "output": ""}]')
    data = load_recovery_data(str(path))
    assert [r["instruction"] for r in data.records] == ["x"] and data.skipped_empty_output == [f"{path} record 1"]


def test_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recovery_data(str(tmp_path / "nope.json"))


def test_shared_alpaca_file_loads(shared_dir):
    data = load_recovery_data("alpaca", data_dir=str(shared_dir / "data"))
    assert data.kind == "alpaca" and len(data.records) == 1996 and len(data.skipped_empty_output) == 4
    assert data.records[0]["instruction"] == "Give three tips for staying healthy."
    assert len(load_recovery_data("alpaca", data_dir=str(shared_dir / "data"), max_samples=5).records) == 5
