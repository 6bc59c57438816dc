"""The next-token rule (sparsefast.serve.sampling): top-k and top-p keep exactly their support; no accepted parameter
makes the distribution NaN/inf (a vanishing temperature is greedy, a vanishing nucleus keeps the top token); the
ranges and limits are OpenAI's."""

from __future__ import annotations

import pytest
import torch

from sparsefast.serve.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams, sample_next, warp_logits


def test_sample_next_support_of_top_k_and_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(97, generator=gen)
    top3 = set(torch.topk(logits, 3).indices.tolist())
    draws = {sample_next(logits, SamplingParams(temperature=2.0, top_k=3), gen) for _ in range(300)}
    assert draws == top3
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    # the nucleus for top_p = mass of the 4 most likely tokens keeps exactly those 4
    p = float(probs[order[:4]].sum()) - 1e-6
    draws = {sample_next(logits, SamplingParams(top_p=p), gen) for _ in range(400)}
    assert draws == set(order[:4].tolist())


# logits with a wide range (a confident model) and a masked token: what makes a careless softmax overflow
WIDE = torch.tensor([30.0, 29.5, -40.0, 12.0, float("-inf"), 0.0, 31.0, -1e4])


@pytest.mark.parametrize("kw", [dict(temperature=t) for t in (1e-300, 5e-324, 1e-40, 1e-7, 1e-4, 0.01, 2.0)]
                         + [dict(temperature=1.0, top_p=p) for p in (1e-300, 5e-324, 1e-40, 1e-9)]
                         + [dict(temperature=1e-40, top_p=1e-300, top_k=1)])
def test_every_accepted_parameter_samples_a_token(kw):
    """Each of these was accepted and made torch.multinomial raise "probability tensor contains inf/nan" (issue 20)."""
    params = SamplingParams(**kw).validate()
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(WIDE, params, gen) for _ in range(50)}
    assert draws <= {0, 1, 3, 5, 6, 7}  # never the -inf token
    if kw.get("temperature", 1.0) < 1e-3 or kw.get("top_p", 1.0) < 1e-3:
        assert draws == {6}  # a vanishing temperature is greedy; a vanishing nucleus keeps the top token


def test_warped_scores_keep_the_top_token_finite():
    for params in (SamplingParams(temperature=1e-5, top_p=1e-300, top_k=3), SamplingParams(temperature=2.0)):
        scores = warp_logits(WIDE, params)
        assert scores.dtype == torch.float32 and scores.shape == WIDE.shape
        assert int(torch.argmax(scores)) == 6 and torch.isfinite(scores[6])
        assert torch.isfinite(torch.softmax(scores, -1)).all()


@pytest.mark.parametrize("bad, needle", [
    (dict(temperature=float("nan")), "temperature: must be a finite number"),
    (dict(temperature=float("inf")), "temperature: must be a finite number"),
    (dict(temperature=2.5), r"temperature: must be in \[0, 2\]"),
    (dict(temperature=True), "temperature: must be a finite number"),
    (dict(top_p=float("nan")), "top_p: must be a finite number"),
    (dict(top_p=1e-400), r"top_p: must be in \(0, 1\]"),
    (dict(max_tokens=True), "max_tokens: must be an integer"),
    (dict(stop=("a",) * (MAX_STOP_STRINGS + 1)), f"stop: at most {MAX_STOP_STRINGS} stop strings"),
    (dict(stop=("x" * (MAX_STOP_CHARS + 1),)), f"stop: a stop string may have at most {MAX_STOP_CHARS} characters"),
    (dict(stop=("ok", "\ud800")), "stop: stop string 1 is not valid Unicode"),
    (dict(ignore_eos="yes"), "ignore_eos: must be true or false"),
])
def test_validate_refuses_what_openai_refuses(bad, needle):
    with pytest.raises(ValueError, match=f"^{needle}"):
        SamplingParams(**bad).validate()
