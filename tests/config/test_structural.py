"""sparsefast.config.structural: every setting refused when a StructuralConfig is made (frozen, validated in
__post_init__), layer ranges (separate attention / MLP, depth-scaled), and the llm-pruner preset."""

from __future__ import annotations

import pytest

from sparsefast.config.structural import PRESETS, StructuralConfig, parse_layer_range


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        StructuralConfig(ratio=ratio)


@pytest.mark.parametrize("field,value", [("importance", "taylor"), ("aggregation", "median"),
                                         ("strategy", "width"), ("gqa", "uneven"), ("ranking", "both")])
def test_unknown_choices(field, value):
    with pytest.raises(ValueError, match=field):
        StructuralConfig(**{field: value})


def test_layer_ranges():
    assert parse_layer_range("3-27", 30) == (3, 28)
    assert parse_layer_range(None, 30) == (1, 29)
    for bad in ("0-2", "2-1", "a-b", "3", "-1-1"):
        with pytest.raises(ValueError, match="layer"):
            parse_layer_range(bad, 2)


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


def test_attention_and_mlp_ranges_are_separate():
    cfg = StructuralConfig(layers="0-3", attn_layers="1-2")
    assert cfg.layer_ranges(4) == ((1, 3), (0, 4))
    assert StructuralConfig(mlp_layers="1-1").layer_ranges(4) == ((1, 3), (1, 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="layer", attn_layers="0-1"), "block strategy only"),
    (dict(mlp_layers="3"), "--mlp-layers"),
    (dict(attn_layers="2-1"), "--attn-layers.*empty"),
    (dict(rounding="ceil"), "rounding"),
])
def test_bad_ranges_and_rounding_fail_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuralConfig(**kwargs)


def test_llm_pruner_preset():
    cfg = StructuralConfig.preset("llm-pruner")
    assert (cfg.importance, cfg.aggregation, cfg.strategy, cfg.ranking, cfg.gqa, cfg.rounding) == (
        "element1", "sum", "block", "local", "kv_groups", "keep_floor")
    assert (cfg.nsamples, cfg.seqlen, cfg.seed, cfg.layers) == (10, 64, 42, "4-29@32")
    assert cfg.layer_ranges(32) == ((4, 30), (4, 30))
    over = StructuralConfig.preset("llm-pruner", seed=1, mlp_layers="0-1")
    assert over.seed == 1 and over.layer_ranges(32) == ((4, 30), (0, 2)) and over.nsamples == 10
    assert set(PRESETS["llm-pruner"]) <= set(StructuralConfig().to_dict())
    with pytest.raises(ValueError, match="unknown preset"):
        StructuralConfig.preset("wanda")
    with pytest.raises(ValueError, match="unknown StructuralConfig field"):
        StructuralConfig.preset("llm-pruner", layer="0-1")
