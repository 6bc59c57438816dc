"""Evaluation texts of the gptq and llm-pruner protocols: exact reconstruction of the reference strings."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from sparsefast.data import BUNDLED_DIR, get_eval_text, get_eval_tokens
from sparsefast.data.evaluation import ptb_rows, wikitext2_rows


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("SPARSEFAST_DATA", raising=False)


@pytest.fixture(scope="module")
def tokenizer(story_llama_dir):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(story_llama_dir)


def test_wikitext2_gptq_text_is_the_hf_join():
    text = get_eval_text("wikitext2")
    # HF wikitext-2-raw-v1 test rows: "", " = Robert Boulter = \n", "", " Robert Boulter is ...\n", ...
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film , television")
    raw = (BUNDLED_DIR / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = wikitext2_rows(raw)
    assert len(rows) == 4358 and sum(1 for r in rows if r) == 2891
    assert rows[:4] == ["", " = Robert Boulter = \n", "", rows[3]] and rows[3].startswith(" Robert Boulter is")
    assert text == "\n\n".join(rows)
    assert get_eval_text("wikitext2", "llm-pruner") == text


def test_wikitext2_llama_token_count():
    """The reconstruction tokenizes to 341,469 LLaMA tokens (BOS included): the count behind every published
    LLaMA WikiText-2 number (166 windows of 2048)."""
    spm = pytest.importorskip("sentencepiece")
    from tests.conftest import SHARED

    model_file = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
    if not model_file.is_file():
        pytest.skip(f"{model_file} not found")
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert len(sp.encode(get_eval_text("wikitext2"))) + 1 == 341_469


def _write_ptb(root):
    (root / "ptb").mkdir(parents=True)
    (root / "ptb" / "ptb.test.txt").write_text(" the cat sat \n a dog ran <unk> \n")
    (root / "ptb" / "ptb.valid.txt").write_text(" valid one \n valid two \n")


def test_ptb_protocols(tmp_path):
    _write_ptb(tmp_path)
    assert ptb_rows(" x y \n z \n") == ["x y", "z"]
    assert get_eval_text("ptb", "gptq", tmp_path) == "the cat sat a dog ran <unk>"
    assert get_eval_text("ptb", "llm-pruner", tmp_path) == "valid one\n\nvalid two"


def test_ptb_missing_lists_places(tmp_path):
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt not found; looked at") as info:
        get_eval_text("ptb", "gptq", tmp_path)
    assert str(tmp_path / "ptb" / "ptb.test.txt") in str(info.value)


def test_c4_protocol_cut(tokenizer, tmp_path):
    docs = [f"document number {i} says hello" for i in range(1200)]
    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4" / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": d, "url": "u"}) for d in docs))
    text = get_eval_text("c4", data_dir=tmp_path)
    assert text == " ".join(docs[:1100])  # the real validation shard wins over the bundled sample
    full = get_eval_tokens("c4", tokenizer, data_dir=tmp_path)
    cut = get_eval_tokens("c4", tokenizer, data_dir=tmp_path, seqlen=16)
    assert cut.shape == (1, 256 * 16) and torch.equal(cut, full[:, : 256 * 16])
    assert full[0].tolist() == tokenizer(text).input_ids


def test_c4_falls_back_to_bundled_sample():
    text = get_eval_text("c4")
    assert text.startswith("The woman who died after falling from a bridge over the A21")


def test_tokens_shape_and_special_tokens(tokenizer, tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = T = \n \n Once upon a time .\n")
    ids = get_eval_tokens("wikitext2", tokenizer, data_dir=tmp_path)
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert ids[0].tolist() == tokenizer("\n\n = T = \n\n\n\n\n Once upon a time .\n").input_ids


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown perplexity dataset 'wikitext'"):
        get_eval_text("wikitext")
    with pytest.raises(ValueError, match="unknown perplexity protocol"):
        get_eval_text("wikitext2", "lm-eval")
    with pytest.raises(ValueError, match="llm-pruner protocol defines wikitext2 and ptb only"):
        get_eval_text("c4", "llm-pruner")
