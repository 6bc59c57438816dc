"""perplexity(): non-overlapping windows, tail dropped, exp(mean NLL) — checked against a direct hand computation."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sparsefast.eval.perplexity import evaluate_perplexity, perplexity, window_nll
from tests.conftest import tiny_model


def hand_ppl(model, tokens, seqlen):
    """exp of the mean, over windows, of each window's mean next-token cross-entropy (the SparseGPT formula:
    nlls.append(loss * seqlen); exp(sum(nlls) / (n * seqlen)))."""
    n = tokens.shape[1] // seqlen
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = tokens[:, i * seqlen:(i + 1) * seqlen]
            logits = model(window).logits.double()
            losses.append(F.cross_entropy(logits[0, :-1], window[0, 1:]).item())
    return math.exp(sum(losses) / n)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_matches_hand_computation(family):
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(1)
    seqlen = 37
    tokens = torch.randint(0, 256, (1, 4 * seqlen + 11), generator=gen)
    expected = hand_ppl(model, tokens, seqlen)
    got = perplexity(model, tokens, seqlen, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # a random-init model is near uniform over the 256-token vocab
    assert 150 < got < 400
    assert perplexity(model, tokens, seqlen, batch_size=3, progress=False) == pytest.approx(expected, rel=1e-5)


def test_tail_is_dropped_and_windows_are_independent():
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (1, 3 * 20 + 19), generator=gen)
    base = perplexity(model, tokens, 20, progress=False)
    changed_tail = tokens.clone()
    changed_tail[0, 60:] = torch.randint(0, 256, (19,), generator=gen)
    assert perplexity(model, changed_tail, 20, progress=False) == base
    assert perplexity(model, tokens[:, :60], 20, progress=False) == base
    single = [perplexity(model, tokens[:, i * 20:(i + 1) * 20], 20, progress=False) for i in range(3)]
    assert base == pytest.approx(math.exp(sum(math.log(p) for p in single) / 3), rel=1e-6)


def test_low_precision_model_accumulates_in_fp32():
    model = tiny_model("llama").to(torch.bfloat16)
    tokens = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    got = perplexity(model, tokens, 32, progress=False)
    assert got == pytest.approx(hand_ppl(model, tokens, 32), rel=1e-3)


def test_errors():
    model = tiny_model("llama")  # max_position_embeddings 256
    tokens = torch.randint(0, 256, (1, 600))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        perplexity(model, tokens, 300, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tokens[:, :50], 64, progress=False)
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        perplexity(model, tokens.view(2, 300), 64, progress=False)
    with pytest.raises(ValueError, match="seqlen must be an integer ≥ 2"):
        perplexity(model, tokens, 1, progress=False)
    with pytest.raises(ValueError, match="outside"):
        perplexity(model, tokens + 256, 64, progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        perplexity(model, tokens.float(), 64, progress=False)


def test_evaluate_perplexity_on_story_llama(story_llama_dir, tmp_path, monkeypatch):
    """End to end on a small local WikiText-2-format file: same number as perplexity() on get_eval_tokens()."""
    from sparsefast.data import get_eval_tokens
    from sparsefast.models import load_model

    monkeypatch.delenv("SPARSEFAST_DATA", raising=False)
    (tmp_path / "wikitext-2-raw").mkdir()
    story = "Once upon a time, there was a little girl named Lily. She liked to play outside in the sun.\n"
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(story * 16)
    model, tokenizer = load_model(str(story_llama_dir))
    result = evaluate_perplexity(model, tokenizer, ["wikitext2"], seqlen=64, data_dir=tmp_path)
    tokens = get_eval_tokens("wikitext2", tokenizer, data_dir=tmp_path)
    assert list(result) == ["wikitext2"]
    assert result["wikitext2"] == pytest.approx(hand_ppl(model, tokens, 64), rel=1e-5)
    # a trained story model predicts a story far better than the same words in scrambled order
    words = story.split()
    random.Random(0).shuffle(words)
    scrambled = tmp_path / "scrambled"
    (scrambled / "wikitext-2-raw").mkdir(parents=True)
    (scrambled / "wikitext-2-raw" / "wiki.test.raw").write_text((" ".join(words) + "\n") * 16)
    worse = evaluate_perplexity(model, tokenizer, ["wikitext2"], seqlen=64, data_dir=scrambled)["wikitext2"]
    assert 1.0 < result["wikitext2"] < worse / 2
    with pytest.raises(ValueError, match="unknown perplexity dataset"):
        evaluate_perplexity(model, tokenizer, ["wikitext2", "wiki"], seqlen=64, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt not found"):
        evaluate_perplexity(model, tokenizer, ["wikitext2", "ptb"], seqlen=64, data_dir=tmp_path)

def test_max_windows_equals_hand_computation_on_prefix():
    model = tiny_model("llama")
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (1, 16 * 5 + 3))
    got = perplexity(model, tokens, 16, max_windows=2, progress=False)
    windows = tokens[0, :32].view(2, 16)
    want = math.exp(window_nll(model, windows).double().sum().item() / (2 * 15))
    assert got == pytest.approx(want, rel=1e-9)
    # a limit above the number of windows is the full evaluation
    assert perplexity(model, tokens, 16, max_windows=99, progress=False) == pytest.approx(
        perplexity(model, tokens, 16, progress=False), rel=1e-12)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_max_windows_raises(bad):
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(tiny_model("llama"), torch.randint(0, 256, (1, 64)), 16, max_windows=bad, progress=False)
