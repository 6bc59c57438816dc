"""Wanda's calibration sampler: same draws as the reference loop, determinism, seeds, shapes, file formats, errors;
find_data_file's search order."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch

from sparsefast.data import BUNDLED_DIR, find_data_file, get_calibration, read_documents, sample_windows


@pytest.fixture(scope="module")
def tokenizer(story_llama_dir):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(story_llama_dir)


def wanda_reference(docs, tokenizer, nsamples, seqlen, seed):
    """Wanda's get_c4 loop, written as in the paper's code: global random.seed, tokenize the drawn document,
    retry until it is longer than seqlen, random crop."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out)


@pytest.fixture(scope="module")
def c4_docs():
    return read_documents(BUNDLED_DIR / "c4" / "c4-sample.00000-of-00001.json.gz")


def test_bundled_c4_sample(c4_docs):
    assert len(c4_docs) == 1000
    assert c4_docs[0].startswith("The woman who died after falling from a bridge over the A21")


def test_matches_wanda_reference_loop(tokenizer, c4_docs):
    state = random.getstate()
    ours = sample_windows(c4_docs, tokenizer, nsamples=6, seqlen=300, seed=3)
    assert random.getstate() == state  # the global RNG is left alone
    ref = wanda_reference(c4_docs, tokenizer, nsamples=6, seqlen=300, seed=3)
    assert ours.dtype == torch.long and torch.equal(ours, ref)


def test_c4_shape_determinism_and_seed(tokenizer, monkeypatch):
    monkeypatch.delenv("SPARSEFAST_DATA", raising=False)  # the bundled sample
    a = get_calibration("c4", tokenizer, nsamples=5, seqlen=128, seed=0)
    b = get_calibration("c4", tokenizer, nsamples=5, seqlen=128, seed=0)
    c = get_calibration("c4", tokenizer, nsamples=5, seqlen=128, seed=1)
    assert a.shape == (5, 128) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tokenizer)
    # fewer samples with the same seed are a prefix: the draws are sequential
    assert torch.equal(get_calibration("c4", tokenizer, nsamples=2, seqlen=128, seed=0), a[:2])


def test_single_document_source_draws_only_crops(tokenizer, tmp_path):
    """A .txt file is one document (SparseGPT/Wanda get_wikitext2): only `randint(0, n - seqlen - 1)` is drawn."""
    text = " ".join(f"word{i}" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    out = get_calibration(str(tmp_path / "corpus.txt"), tokenizer, nsamples=4, seqlen=32, seed=7)
    ids = tokenizer(text).input_ids
    rng = random.Random(7)
    for row in out:
        start = rng.randint(0, len(ids) - 32 - 1)
        assert row.tolist() == ids[start:start + 32]


def test_wikitext2_source_uses_non_test_split(tokenizer, tmp_path):
    raw = tmp_path / "wikitext-2-raw"
    raw.mkdir()
    (raw / "wiki.valid.raw").write_text(" \n = Valid = \n \n" + " alpha beta gamma delta\n" * 50)
    out = get_calibration("wikitext2", tokenizer, nsamples=3, seqlen=16, data_dir=tmp_path)
    assert out.shape == (3, 16)
    assert "alpha" in tokenizer.decode(out[0])


def test_jsonl_and_json_documents(tmp_path):
    rows = [{"text": "first doc"}, {"text": ""}, {"text": "second doc", "meta": 1}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "b.json.gz", "wt") as f:  # JSON lines under a .json.gz name, as C4 ships
        f.write("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "c.json").write_text(json.dumps(["first doc", "second doc"]))
    (tmp_path / "d.json").write_text(json.dumps({"text": ["first doc", "second doc"]}))
    for name in ("a.jsonl", "b.json.gz", "c.json", "d.json"):
        assert read_documents(tmp_path / name) == ["first doc", "second doc"], name
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="string 'text' field"):
        read_documents(tmp_path / "bad.jsonl")


def test_bad_sizes(tokenizer):
    for n in (0, -3):
        with pytest.raises(ValueError, match="nsamples must be an integer ≥ 1"):
            get_calibration("c4", tokenizer, nsamples=n, seqlen=16)
    with pytest.raises(ValueError, match="seqlen must be an integer ≥ 1"):
        get_calibration("c4", tokenizer, nsamples=1, seqlen=0)


def test_text_too_short_reports_longest_document(tokenizer, tmp_path):
    docs = ["short one", "a slightly longer document here", "tiny"]
    longest = max(len(tokenizer(d).input_ids) for d in docs)
    (tmp_path / "short.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    with pytest.raises(ValueError, match=f"the longest of 3 has {longest} tokens"):
        get_calibration(str(tmp_path / "short.jsonl"), tokenizer, nsamples=2, seqlen=longest)
    # one token shorter works: the longest document qualifies (strictly longer than seqlen)
    assert get_calibration(str(tmp_path / "short.jsonl"), tokenizer, 2, longest - 1).shape == (2, longest - 1)
    (tmp_path / "one.txt").write_text("hi")
    with pytest.raises(ValueError, match="calibration text too short"):
        get_calibration(str(tmp_path / "one.txt"), tokenizer, nsamples=1, seqlen=64)


def test_missing_calibration_file(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither one of c4, wikitext2 nor an existing file"):
        get_calibration(str(tmp_path / "missing.jsonl"), tokenizer, 1, 8)


def test_find_data_file_order_and_error(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    for base in (explicit, env):
        (base / "c4").mkdir(parents=True)
    rel = "c4/c4-sample.00000-of-00001.json.gz"
    monkeypatch.setenv("SPARSEFAST_DATA", str(env))
    assert find_data_file(rel, explicit) == BUNDLED_DIR / rel
    (env / rel).write_bytes(b"")
    assert find_data_file(rel, explicit) == env / rel
    (explicit / rel).write_bytes(b"")
    assert find_data_file(rel, explicit) == explicit / rel
    # a preferred file anywhere beats a fallback in an earlier directory
    (env / "c4" / "preferred.json.gz").write_bytes(b"")
    assert find_data_file(["c4/preferred.json.gz", rel], explicit) == env / "c4" / "preferred.json.gz"
    with pytest.raises(FileNotFoundError) as info:
        find_data_file("ptb/ptb.test.txt", explicit)
    msg = str(info.value)
    for looked in (explicit / "ptb/ptb.test.txt", env / "ptb/ptb.test.txt", BUNDLED_DIR / "ptb/ptb.test.txt"):
        assert str(looked) in msg
    assert "--data-dir" in msg and "SPARSEFAST_DATA" in msg
