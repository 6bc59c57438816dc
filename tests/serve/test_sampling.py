"""The next-token rule (sparsefast.serve.sampling.sample_next): top-k and top-p keep exactly their support."""

from __future__ import annotations

import torch

from sparsefast.serve.sampling import SamplingParams, sample_next


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
