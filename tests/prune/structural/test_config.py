"""Layer ranges (separate attention / MLP, depth-scaled), LLM-Pruner's rounding, and the llm-pruner preset."""

from __future__ import annotations

import pytest
import torch

from sparsefast.prune.structural import StructuralConfig, prune_structured
from sparsefast.prune.structural.config import PRESETS, parse_layer_range
from sparsefast.prune.structural.graph import build_graph
from sparsefast.prune.structural.strategies import _count, plan_candidates
from tests.conftest import tiny_model


def test_depth_scaled_ranges():
    assert parse_layer_range("4-29@32", 32) == (4, 30)       # LLM-Pruner's range(4, 30) on LLaMA-7B
    assert parse_layer_range("4-29@32", 30) == (4, 28)       # 3.75 → 4, 28.125 → 28: layers 4-27 of SmolLM2-135M
    assert parse_layer_range("4-29@32", 22) == (3, 21)
    assert parse_layer_range("4-29@32", 2) == (0, 2)
    with pytest.raises(ValueError, match="maps to no layer"):
        parse_layer_range("10-11@32", 2)
    with pytest.raises(ValueError, match="past its 32-layer"):
        parse_layer_range("0-40@32", 30)


def test_default_range_on_two_layers_says_why_and_what_to_pass():
    with pytest.raises(ValueError, match=r"skips the first and the last decoder layer.*--layers 0-1"):
        parse_layer_range(None, 2)
    with pytest.raises(ValueError, match=r"--layers 0-1"):
        prune_structured(tiny_model("llama").float(), None, StructuralConfig(importance="l2"))


def test_attention_and_mlp_ranges_are_separate():
    cfg = StructuralConfig(layers="0-3", attn_layers="1-2")
    assert cfg.layer_ranges(4) == ((1, 3), (0, 4))
    assert StructuralConfig(mlp_layers="1-1").layer_ranges(4) == ((1, 3), (1, 2))
    model = tiny_model("llama", num_hidden_layers=4).float()
    report = prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", attn_layers="1-2",
                                                            mlp_layers="0-3"))
    per_layer = report["removed"]["per_layer"]
    assert [per_layer[str(i)]["query_heads"] for i in range(4)] == [0, 2, 2, 0]
    assert [per_layer[str(i)]["mlp_channels"] for i in range(4)] == [64] * 4
    assert report["layer_ranges"] == {"attention": [1, 3], "mlp": [0, 4]} and report["layer_range"] == [0, 4]
    assert [info["num_attention_heads"] for info in report["layers"]] == [4, 2, 2, 4]
    # a kind left unpruned needs no range: the 2-layer default (which leaves no layer) is never consulted
    report = prune_structured(tiny_model("llama").float(), None, StructuralConfig(
        ratio=0.5, importance="l2", prune_attention=False, mlp_layers="0-1"))
    assert report["layer_ranges"] == {"attention": None, "mlp": [0, 2]}


@pytest.mark.parametrize("cfg,match", [
    (StructuralConfig(strategy="layer", attn_layers="0-1"), "block strategy only"),
    (StructuralConfig(mlp_layers="3"), "--mlp-layers"),
    (StructuralConfig(attn_layers="2-1"), "--attn-layers.*empty"),
    (StructuralConfig(rounding="ceil"), "rounding"),
])
def test_bad_ranges_and_rounding_fail_in_validate(cfg, match):
    with pytest.raises(ValueError, match=match):
        cfg.validate()


@pytest.mark.parametrize("ratio,n,width,half_up,keep_floor", [
    (0.2, 1536, 1, 307, 308),      # SmolLM2 MLP: 1536 - int(1228.8) = 308
    (0.2, 11008, 1, 2202, 2202),   # LLaMA-7B MLP at 20%: 11008 - int(8806.4)
    (0.25, 11008, 1, 2752, 2752),
    (0.2, 32, 128, 6, 6),          # LLaMA-7B heads: (4096 - int(3276.8)) // 128 = 820 // 128
    (0.2, 3, 64, 1, 0),            # SmolLM2 KV groups: (192 - int(153.6)) // 64 = 39 // 64
    (0.3, 2, 16, 1, 0),            # (32 - int(22.4)) // 16 = 10 // 16
    (0.0, 9, 64, 0, 0),
])
def test_rounding_rules(ratio, n, width, half_up, keep_floor):
    assert _count(ratio, n, "half_up", width) == half_up
    assert _count(ratio, n, "keep_floor", width) == keep_floor


def test_keep_floor_changes_what_a_plan_removes():
    model = tiny_model("llama").float()
    graph = build_graph(model)
    removes = {}
    for rounding in ("half_up", "keep_floor"):
        plan = plan_candidates(model, graph, StructuralConfig(ratio=0.3, layers="0-1", rounding=rounding))
        removes[rounding] = sorted({(b.kind, b.remove) for b in plan.buckets})
    # MLP 128 channels: half up 38.4 → 38, LLM-Pruner 128 - int(89.6) = 39; query heads 2 per KV group: 1 vs 0
    assert removes == {"half_up": [("mlp", 38), ("query", 1)], "keep_floor": [("mlp", 39), ("query", 0)]}


def test_llm_pruner_preset():
    cfg = StructuralConfig.preset("llm-pruner")
    assert (cfg.importance, cfg.aggregation, cfg.strategy, cfg.ranking, cfg.gqa, cfg.rounding) == (
        "element1", "sum", "block", "local", "kv_groups", "keep_floor")
    assert (cfg.nsamples, cfg.seqlen, cfg.seed, cfg.layers) == (10, 64, 42, "4-29@32")
    assert cfg.layer_ranges(32) == ((4, 30), (4, 30))
    cfg.validate()
    over = StructuralConfig.preset("llm-pruner", seed=1, mlp_layers="0-1")
    assert over.seed == 1 and over.layer_ranges(32) == ((4, 30), (0, 2)) and over.nsamples == 10
    assert set(PRESETS["llm-pruner"]) <= set(StructuralConfig().to_dict())
    with pytest.raises(ValueError, match="unknown preset"):
        StructuralConfig.preset("wanda")
    with pytest.raises(ValueError, match="unknown StructuralConfig field"):
        StructuralConfig.preset("llm-pruner", layer="0-1")


def test_seqlen_above_context_fails_before_calibration():
    model = tiny_model("llama").float()     # max_position_embeddings 256
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        prune_structured(model, None, StructuralConfig(seqlen=300, layers="0-1"))   # tokenizer None: never reached
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_structured(model, None, StructuralConfig(seqlen=300, layers="0-1", importance="l2"))   # no calibration
