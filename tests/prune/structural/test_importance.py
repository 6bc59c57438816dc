"""Importance formulas on hand-sized cases, aggregation, and gradient accumulation (per-sample Fisher)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefast.prune.structural.config import StructuralConfig
from sparsefast.prune.structural.graph import Member, build_graph
from sparsefast.prune.structural.importance import accumulate_gradients, aggregate, channel_scores, unit_importance
from tests.conftest import tiny_model

W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
G = torch.tensor([[0.5, 1.0], [-1.0, 2.0]])
F = torch.tensor([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize("kind,dim,want", [
    ("l2", 0, [5.0, 25.0]), ("l2", 1, [10.0, 20.0]),
    ("element1", 0, [2.5, 11.0]), ("element1", 1, [3.5, 10.0]),
    ("vector", 0, [1.5, 5.0]), ("vector", 1, [2.5, 6.0]),
    ("element2", 0, [4.5, 45.5]), ("element2", 1, [14.0, 36.0]),
    ("mix", 0, [6.0, 40.5]), ("mix", 1, [16.5, 30.0]),
])
def test_channel_scores_hand_computed(kind, dim, want):
    got = channel_scores(W, dim, kind, G, F)
    assert torch.allclose(got, torch.tensor(want)), (kind, dim, got)


def test_aggregations():
    members = [Member("a", "a", 0, torch.tensor([0]), 3), Member("b", "b", 1, torch.tensor([0]), 7),
               Member("c", "c", 0, torch.tensor([0]), 5)]
    scores = [2.0, 3.0, 4.0]
    assert aggregate(scores, members, "sum") == 9.0
    assert aggregate(scores, members, "mean") == 3.0
    assert aggregate(scores, members, "max") == 4.0
    assert aggregate(scores, members, "last") == 3.0   # member b runs last
    assert math.isclose(aggregate(scores, members, "prod"), math.log(24.0))
    assert aggregate([0.0, 1.0], members[:2], "prod") == -math.inf
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(scores, members, "median")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_are_per_sample_sums_and_squares(checkpointing):
    model = tiny_model("llama").float()
    calib = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    _, layers = model.model, model.model.layers
    grad, fisher, stats = accumulate_gradients(model, {name: param}, calib, fisher=True, layers=layers,
                                               checkpointing=checkpointing)
    per_sample = []
    for row in calib:
        model.zero_grad()
        model(input_ids=row[None], labels=row[None]).loss.backward()
        per_sample.append(param.grad.detach().clone())
    model.zero_grad()
    assert torch.allclose(grad[name], sum(per_sample), atol=1e-6)
    assert torch.allclose(fisher[name], sum(g * g for g in per_sample), atol=1e-8)
    assert stats["peak_rss_mb"] > 0 and stats["calib_loss"] > 0
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_unit_importance_matches_manual_element1():
    model = tiny_model("llama").float()
    graph = build_graph(model)
    units = graph.mlp[0][:5]
    calib = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    cfg = StructuralConfig(importance="element1", aggregation="sum")
    scores, _ = unit_importance(model, units, cfg, calib)
    params = dict(model.named_parameters())
    grad, _, _ = accumulate_gradients(model, {n: params[n] for n in {m.param for u in units for m in u.members}},
                                      calib, fisher=False, checkpointing=False)
    for u, s in zip(units, scores):
        want = sum(float((params[m.param].detach() * grad[m.param]).abs().index_select(m.dim, m.index).sum())
                   for m in u.members)
        assert math.isclose(s, want, rel_tol=1e-5)


def test_random_and_l2_need_no_data():
    model = tiny_model("qwen2").float()
    graph = build_graph(model)
    units = graph.mlp[1]
    a, _ = unit_importance(model, units, StructuralConfig(importance="random", seed=3), None)
    b, _ = unit_importance(model, units, StructuralConfig(importance="random", seed=3), None)
    assert a == b and len(set(a)) == len(a)
    l2, _ = unit_importance(model, units[:1], StructuralConfig(importance="l2"), None)
    w = dict(model.named_parameters())
    want = sum(float(w[m.param].detach().index_select(m.dim, m.index).pow(2).sum()) for m in units[0].members)
    assert math.isclose(l2[0], want, rel_tol=1e-6)
    with pytest.raises(ValueError, match="calibration"):
        unit_importance(model, units, StructuralConfig(importance="vector"), None)
