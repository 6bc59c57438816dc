"""Importance formulas on hand-sized cases, aggregation, and gradient accumulation (per-sample Fisher)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsefast.config.structural import StructuralConfig
from sparsefast.prune.structural.graph import Member, build_graph
from sparsefast.prune.structural.importance import (
    accumulate_gradients,
    aggregate,
    aggregate_head,
    channel_scores,
    unit_importance,
)
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


def _member(name, dim, order):
    return Member(name, name, dim, torch.tensor([0]), order)


def test_head_aggregation_is_per_channel_then_summed_over_head_dim():
    # two heads of head_dim 2, members q rows (dim 0) and o_proj columns (dim 1), per-channel scores by hand
    members = [_member("q", 0, 0), _member("o", 1, 1)]
    head_a = [torch.tensor([4.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)]
    head_b = [torch.tensor([3.0, 3.0], dtype=torch.float64), torch.tensor([3.0, 3.0], dtype=torch.float64)]
    # max: Σ_c max_m = 4 + 4 = 8 and 3 + 3 = 6 (member sums first would give max(5, 5) = 5 < max(6, 6) = 6)
    assert aggregate_head(head_a, members, "max") == 8.0 and aggregate_head(head_b, members, "max") == 6.0
    assert aggregate([5.0, 5.0], members, "max") < aggregate([6.0, 6.0], members, "max")   # the other order flips
    # prod: log Σ_c Π_m = log(4·1 + 1·4) = log 8 and log(9 + 9) = log 18 (member sums first: log 25, log 36)
    assert math.isclose(aggregate_head(head_a, members, "prod"), math.log(8.0))
    assert math.isclose(aggregate_head(head_b, members, "prod"), math.log(18.0))
    # sum, mean and last do not depend on the order
    for head in (head_a, head_b):
        sums = [float(v.sum()) for v in head]
        for how in ("sum", "mean", "last"):
            assert math.isclose(aggregate_head(head, members, how), aggregate(sums, members, how)), how
    # a member spanning two heads (a KV group's q rows) folds onto head_dim by summing its heads: [1+3, 2+4]
    kv_members = [_member("q", 0, 0), _member("k", 0, 1)]
    folded = [torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.tensor([5.0, 1.0], dtype=torch.float64)]
    assert aggregate_head(folded, kv_members, "max") == 5.0 + 6.0
    assert aggregate_head(folded, kv_members, "sum") == 16.0
    with pytest.raises(ValueError, match="aligned"):
        aggregate_head([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)], kv_members, "max")


@pytest.mark.parametrize("gqa", ["divisible", "kv_groups"])
def test_head_scores_on_a_model_follow_llm_pruners_order(gqa):
    model = tiny_model("llama").float()
    graph = build_graph(model)
    groups = graph.attention[0]
    units = [g.unit for g in groups] if gqa == "kv_groups" else [q for g in groups for q in g.queries]
    calib = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    params = dict(model.named_parameters())
    grad, _, _ = accumulate_gradients(model, {n: params[n] for n in {m.param for u in units for m in u.members}},
                                      calib, fisher=False, checkpointing=False)

    def per_channel(m):   # element1 per channel of member m, folded onto head_dim (16)
        s = (params[m.param].detach() * grad[m.param]).abs().sum(1 - m.dim).double()[m.index]
        return s.reshape(-1, 16).sum(0)

    for how in ("max", "prod", "sum", "mean"):
        scores, _ = unit_importance(model, units, StructuralConfig(importance="element1", aggregation=how), calib)
        for u, got in zip(units, scores):
            stacked = torch.stack([per_channel(m) for m in u.members])
            member_sums = stacked.sum(1)
            want = {"max": stacked.max(0).values.sum(), "prod": torch.logsumexp(stacked.log().sum(0), 0),
                    "sum": member_sums.sum(), "mean": member_sums.mean()}[how]     # sum, mean: member sums first
            assert math.isclose(got, float(want), rel_tol=1e-6), (how, got, float(want))


def test_kv_group_is_scored_from_the_query_heads_removed_with_it():
    """4 query heads on 2 KV heads (n_rep 2, head_dim 16): KV group g owns query heads 2g, 2g+1 (HF repeat_kv).
    l2 on hand-set weights: q rows of head h all equal a_h = (1, 3, 2, 0), every other attention weight 0.
    sparsefast: group 0 = heads {0, 1} → 1024·(1 + 9) = 10240, group 1 = heads {2, 3} → 1024·(4 + 0) = 4096, so
    group 1 goes with heads 2, 3. LLM-Pruner's Llama-3 fold would score group 0 from heads {0, 2} (5120) and group 1
    from {1, 3} (9216) and remove group 0 with heads 0, 1 — the heads its score did not measure."""
    from sparsefast.prune.structural import prune_structured

    model = tiny_model("llama").float()
    values = torch.tensor([1.0, 3.0, 2.0, 0.0]).repeat_interleave(16)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.copy_(values[:, None].expand(64, 64))
            for lin in (attn.k_proj, attn.v_proj, attn.o_proj):
                lin.weight.zero_()
    graph = build_graph(model)
    units = [g.unit for g in graph.attention[0]]
    for g, u in enumerate(units):
        q = next(m for m in u.members if m.param.endswith("q_proj.weight"))
        assert q.index.tolist() == list(range(32 * g, 32 * g + 32))
    scores, _ = unit_importance(model, units, StructuralConfig(importance="l2"), None)
    assert scores == [16 * 64 * (1 + 9), 16 * 64 * (4 + 0)]
    cfg = StructuralConfig(ratio=0.5, importance="l2", gqa="kv_groups", layers="0-1")
    report = prune_structured(model, None, cfg)
    assert report["removed"]["per_layer"]["0"] == {"query_heads": 2, "kv_heads": 1, "mlp_channels": 64}
    kept = model.model.layers[0].self_attn.q_proj.weight
    assert kept.shape == (32, 64) and torch.equal(kept[:, 0], values[:32])     # heads 0 and 1 stay
