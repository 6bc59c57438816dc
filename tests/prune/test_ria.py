"""RIA: the score against an element-by-element reading of the paper's equation, the three comparison groups, the
engine path."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sparsefast.api import prune
from sparsefast.config import RIAConfig
from sparsefast.prune import ria_mask, ria_score
from sparsefast.prune.base import max_nonzeros_per_group
from sparsefast.prune.ria import permute_input_channels, reallocation_order
from tests.conftest import tiny_model


def loop_score(w, sq, a):
    rows, cols = w.shape
    row_sum = [sum(abs(float(w[i, k])) for k in range(cols)) for i in range(rows)]
    col_sum = [sum(abs(float(w[k, j])) for k in range(rows)) for j in range(cols)]
    return torch.tensor([[(abs(float(w[i, j])) / row_sum[i] + abs(float(w[i, j])) / col_sum[j])
                          * math.sqrt(float(sq[j])) ** a for j in range(cols)] for i in range(rows)])


def lowest(scores, k):
    """Indices of the k lowest (score, index) pairs."""
    return sorted(range(len(scores)), key=lambda j: (scores[j], j))[:k]


def test_score_is_the_papers_equation():
    g = torch.Generator().manual_seed(0)
    w, sq = torch.randn(6, 10, generator=g), torch.rand(10, generator=g) * 5
    for a in (0.5, 1.0, 0.0):
        torch.testing.assert_close(ria_score(w, sq, a), loop_score(w, sq, a), rtol=1e-5, atol=1e-7)


def test_hand_case():
    w = torch.tensor([[1.0, -3.0], [2.0, 0.0]])
    sq = torch.tensor([4.0, 16.0])  # ‖X‖ = 2, 4; a = 0.5: factors √2, 2
    want = torch.tensor([[(1 / 4 + 1 / 3) * math.sqrt(2), (3 / 4 + 3 / 3) * 2], [(2 / 2 + 2 / 3) * math.sqrt(2), 0.0]])
    torch.testing.assert_close(ria_score(w, sq), want)


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_unstructured_groups(scope):
    g = torch.Generator().manual_seed(1)
    w, sq = torch.randn(8, 12, generator=g), torch.rand(12, generator=g)
    mask = ria_mask(w, sq, sparsity=0.5, scope=scope)
    ref = loop_score(w, sq, 0.5)
    want = torch.zeros(8, 12, dtype=torch.bool)
    if scope == "layer":
        for f in lowest(ref.flatten().tolist(), 48):
            want.view(-1)[f] = True
    else:
        for i in range(8):
            want[i, lowest(ref[i].tolist(), 6)] = True
    assert torch.equal(mask, want)
    assert scope == "row" or not torch.equal(mask.sum(1), torch.full((8,), 6))  # layer scope: rows differ


def test_nm_groups():
    g = torch.Generator().manual_seed(2)
    w, sq = torch.randn(5, 16, generator=g), torch.rand(16, generator=g)
    mask = ria_mask(w, sq, n=2, m=4)
    ref = loop_score(w, sq, 0.5)
    for i in range(5):
        for q in range(4):
            group = ref[i, 4 * q:4 * q + 4].tolist()
            assert sorted(4 * q + j for j in lowest(group, 2)) == mask[i].nonzero().flatten()[2 * q:2 * q + 2].tolist()


def test_engine_prunes_with_ria():
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    model = tiny_model("llama", num_hidden_layers=2)
    report = prune(model, RIAConfig(nsamples=4, seqlen=16, batch_size=2, pattern="2:4"), calib, progress=False)
    assert report["method"] == "ria" and report["achieved_sparsity"] >= 0.5
    for name, p in model.named_parameters():
        if p.dim() == 2 and "layers" in name:
            assert max_nonzeros_per_group(p, 4) <= 2, name


@pytest.mark.parametrize("kwargs, match", [({"alpha": -1.0}, "alpha"), ({"scope": "block"}, "scope")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RIAConfig(**kwargs)


def test_reallocation_order_deals_importance_classes_round_the_group():
    g = torch.Generator().manual_seed(3)
    score = torch.rand(4, 16, generator=g)
    order = reallocation_order(score, 4)
    ranked = sorted(range(16), key=lambda j: (float(score[:, j].sum()), j))
    for q in range(4):
        part = ranked[4 * q:4 * q + 4]
        assert order[q::4].tolist() == (part[::-1] if q % 2 else part)
    assert sorted(order.tolist()) == list(range(16))


def test_permuting_the_mlp_channels_keeps_the_function():
    model = tiny_model("llama", num_hidden_layers=1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, mlp.gate_proj.in_features)
    with torch.no_grad():
        before = mlp(x)
        order = torch.randperm(mlp.down_proj.in_features, generator=torch.Generator().manual_seed(0))
        permute_input_channels(mlp.down_proj, [mlp.gate_proj, mlp.up_proj], order)
        torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-6)


def test_engine_reallocates_the_down_projection_only():
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    config = RIAConfig(nsamples=4, seqlen=16, batch_size=2, pattern="2:4")
    model = tiny_model("llama", num_hidden_layers=2)
    report = prune(model, config, calib, progress=False)
    notes = {n: s["reallocation"] for n, s in report["linears"].items() if "reallocation" in s}
    assert sorted(notes) == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]
    note = notes["layers.0.mlp.down_proj"]
    assert note["applied"] and note["kept_score_after"] > note["kept_score_before"]  # the heuristic helped here
    plain = tiny_model("llama", num_hidden_layers=2)
    prune(plain, dataclasses.replace(config, reallocation=False), calib, progress=False)
    a, b = model.model.layers[0].mlp, plain.model.layers[0].mlp  # same inputs: layer 0 sees the dense embeddings
    order = torch.tensor(note["order"])
    assert torch.equal(a.gate_proj.weight, b.gate_proj.weight[order])  # producers permuted with the same order
    assert torch.equal(a.up_proj.weight, b.up_proj.weight[order])
    assert not torch.equal(a.down_proj.weight != 0, (b.down_proj.weight != 0)[:, order])  # another 2:4 choice
    assert ((a.down_proj.weight != 0) == (a.down_proj.weight[:, :] != 0)).all()
    for name, p in model.named_parameters():
        if p.dim() == 2 and "layers" in name:
            assert max_nonzeros_per_group(p, 4) <= 2, name
