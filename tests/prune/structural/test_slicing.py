"""Physical slicing: the pruned model computes what the masked dense model computes."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsefast.prune.structural import StructuralConfig, build_graph, mask_dense, prune_structured
from sparsefast.prune.structural.importance import unit_importance
from sparsefast.prune.structural.strategies import plan_candidates, select
from tests.conftest import tiny_model

CALIB = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))


def pruned_and_masked(family, cfg, **overrides):
    model = tiny_model(family, **overrides).float()
    dense = copy.deepcopy(model)
    masked = copy.deepcopy(model)
    report = prune_structured(model, None, cfg, CALIB)
    graph = build_graph(masked)
    plan = plan_candidates(masked, graph, cfg)
    scores, _ = unit_importance(masked, plan.units, cfg, CALIB)
    removed = select(plan, scores, cfg)
    mask_dense(masked, [u for u in removed if u.kind != "layer"], [u.layer for u in removed if u.kind == "layer"])
    with torch.no_grad():
        return model, report, model(IDS).logits, masked(IDS).logits, dense(IDS).logits


@pytest.mark.parametrize("family,gqa,importance", [
    ("llama", "divisible", "element1"), ("llama", "kv_groups", "mix"), ("qwen2", "divisible", "element2"),
    ("mistral", "kv_groups", "vector"), ("opt", "divisible", "l2"), ("gpt_neox", "divisible", "element1"),
])
def test_block_pruned_equals_masked_dense(family, gqa, importance):
    cfg = StructuralConfig(ratio=0.5, importance=importance, layers="0-1", gqa=gqa, aggregation="sum")
    model, report, out, ref, dense = pruned_and_masked(family, cfg)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, dense, atol=1e-3)
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["after"]["macs_per_token"]["total"] < report["before"]["macs_per_token"]["total"]
    for info in report["layers"]:
        assert info["intermediate_size"] == 64
        assert info["num_attention_heads"] % info["num_key_value_heads"] == 0
    if family == "llama":
        attn = model.model.layers[0].self_attn
        nq, nkv = report["layers"][0]["num_attention_heads"], report["layers"][0]["num_key_value_heads"]
        assert (nq, nkv) == ((2, 2) if gqa == "divisible" else (2, 1))
        assert attn.num_key_value_groups == nq // nkv
        assert attn.q_proj.out_features == nq * 16 and attn.k_proj.out_features == nkv * 16
        assert model.model.layers[0].mlp.down_proj.in_features == 64


def test_layer_strategy_equals_zeroed_layer():
    cfg = StructuralConfig(ratio=0.5, importance="element1", strategy="layer", layers="0-1")
    model, report, out, ref, _ = pruned_and_masked("llama", cfg, num_hidden_layers=4)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert len(report["removed"]["decoder_layers"]) == 1
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    model.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False)


def test_channel_strategy_shrinks_hidden_size():
    cfg = StructuralConfig(ratio=0.25, importance="l2", strategy="channel")
    model = tiny_model("llama").float()
    report = prune_structured(model, None, cfg, None)
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    assert model.model.embed_tokens.weight.shape == (256, 48) and model.lm_head.in_features == 48
    assert model.model.layers[1].self_attn.q_proj.in_features == 48
    assert report["removed"]["hidden_channels"] == 16
    assert torch.isfinite(model(IDS).logits).all()
    with pytest.raises(ValueError, match="head_dim"):
        prune_structured(tiny_model("opt"), None, cfg, None)


def test_global_ranking_keeps_budget_and_divisibility():
    cfg = StructuralConfig(ratio=0.5, importance="random", layers="0-2", ranking="global")
    model = tiny_model("llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2)
    report = prune_structured(model, None, cfg, None)
    mlp = [info["intermediate_size"] for info in report["layers"]]
    assert sum(mlp) == 3 * 128 - 3 * 64 and min(mlp) >= 1
    for info in report["layers"]:
        assert info["num_key_value_heads"] == 2 and info["num_attention_heads"] % 2 == 0
        assert info["num_attention_heads"] >= 2
