"""sparsefast.export.architecture: per-layer widths from the weights, the families that export, the plain config of
uniformly pruned models, and `prune-structured --uniform` (StructuralConfig.uniform) end to end."""

from __future__ import annotations

import pytest
import torch
import transformers

from sparsefast.config.structural import StructuralConfig
from sparsefast.export.architecture import (
    LayerWidths,
    check_exportable,
    layer_widths,
    set_plain_config,
    uniform_widths,
)
from tests.conftest import tiny_model
from tests.export.conftest import pruned_story


def test_layer_widths_dense_and_layerwise(story, story_layerwise, story_kv_groups):
    assert layer_widths(story[0]) == [LayerWidths(8, 4, 384)] * 2
    assert uniform_widths(layer_widths(story[0])) == LayerWidths(8, 4, 384)
    assert layer_widths(story_layerwise[0]) == [LayerWidths(8, 4, 384), LayerWidths(4, 4, 269)]
    assert uniform_widths(layer_widths(story_layerwise[0])) is None
    assert layer_widths(story_kv_groups[0])[1] == LayerWidths(4, 2, 192)


@pytest.mark.parametrize("family,overrides,needle", [
    ("qwen2", {}, "qwen2"),                 # q/k/v biases: not llama.cpp's llama block
    ("opt", {}, "LLaMA family"),
    ("llama", {"attention_bias": True}, "bias"),
    ("llama", {"hidden_act": "gelu"}, "SiLU"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope scaling"),
    ("mistral", {"sliding_window": 16}, "sliding window"),
])
def test_check_exportable_refuses(family, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        check_exportable(tiny_model(family, **overrides))


def test_check_exportable_accepts_llama_and_mistral():
    check_exportable(tiny_model("llama"))
    check_exportable(tiny_model("mistral", sliding_window=None))


def test_set_plain_config_refuses_different_widths(story_layerwise):
    with pytest.raises(ValueError, match="layer 1 has 4 heads"):
        set_plain_config(story_layerwise[0])


def test_uniform_pruning_saves_a_plain_checkpoint(story_llama_dir, tmp_path):
    """--uniform prunes every layer alike; the saved config alone (no structure.json, no sparsefast) rebuilds the
    model in transformers with the same logits (without set_plain_config the config still says 8 heads and 384 MLP
    channels and the saved weights do not load)."""
    model, tok = pruned_story(story_llama_dir, ratio=0.3, uniform=True)
    assert layer_widths(model) == [LayerWidths(4, 4, 269)] * 2
    assert set_plain_config(model) == LayerWidths(4, 4, 269)
    model.save_pretrained(tmp_path / "plain")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert (plain.config.num_attention_heads, plain.config.head_dim, plain.config.intermediate_size) == (4, 16, 269)
    ids = tok("Once upon a time there was", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_uniform_config_rules():
    assert StructuralConfig(uniform=True).layer_ranges(5) == ((0, 5), (0, 5))
    assert StructuralConfig(uniform=True, prune_attention=False).layer_ranges(5) == (None, (0, 5))
    with pytest.raises(ValueError, match="drop --layers"):
        StructuralConfig(uniform=True, layers="1-2")
    with pytest.raises(ValueError, match="strategy block"):
        StructuralConfig(uniform=True, strategy="channel")
    with pytest.raises(ValueError, match="ranking local"):
        StructuralConfig(uniform=True, ranking="global")
    assert StructuralConfig.preset("llm-pruner", uniform=True, layers=None).layer_ranges(30) == ((0, 30), (0, 30))
