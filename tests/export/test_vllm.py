"""sparsefast.export.vllm: a plain checkpoint when every layer has the same widths, else a DeciLMForCausalLM
(nemotron-nas) directory whose zero-padded attention computes exactly what the pruned layer computes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaAttention

from sparsefast.export.vllm import export_vllm
from tests.export.conftest import pruned_story


def _attention_outputs(config, layer_idx, weights, attn_module, hidden, model):
    """(output of a full-width LlamaAttention holding `weights`, output of the pruned `attn_module`)."""
    full = LlamaAttention(config, layer_idx).eval()
    full.load_state_dict(weights)
    pos = torch.arange(hidden.shape[1])[None]
    emb = model.model.rotary_emb(hidden, pos)
    mask = torch.full((hidden.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        return full(hidden, emb, mask)[0], attn_module(hidden, emb, mask)[0]


@pytest.mark.parametrize("fixture", ["story_layerwise", "story_kv_groups"])
def test_decilm_padding_is_exact(request, fixture, tmp_path):
    model, tok = request.getfixturevalue(fixture)
    summary = export_vllm(model, tok, tmp_path / "out")
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 4)
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [2, 2]
    assert [b["ffn"]["intermediate_size"] for b in config["block_configs"]] == [
        layer.mlp.gate_proj.out_features for layer in model.model.layers]
    assert "ffn_mult" not in config["block_configs"][1]["ffn"]   # vLLM would derive the width from it
    report = json.loads((out / "sparsefast.json").read_text())
    kv = model.model.layers[1].self_attn.k_proj.out_features // 16
    q = model.model.layers[1].self_attn.q_proj.out_features // 16
    assert report["padding_bytes"] == summary["padding_bytes"] == 2 * ((8 - q) + (4 - kv)) * 16 * 128 * 4
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in state   # tied
    assert state["model.layers.1.mlp.down_proj.weight"].shape[1] == model.model.layers[1].mlp.down_proj.in_features
    full_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "max_position_embeddings", "rope_parameters")})
    full_config._attn_implementation = "eager"
    model.config._attn_implementation = "eager"
    hidden = torch.randn(1, 7, 128)
    for i in range(2):
        weights = {f"{n}.weight": state[f"model.layers.{i}.self_attn.{n}.weight"]
                   for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        ours, pruned = _attention_outputs(full_config, i, weights, model.model.layers[i].self_attn, hidden, model)
        torch.testing.assert_close(ours, pruned, rtol=1e-5, atol=1e-6)


def test_decilm_config_class_round_trip(story_layerwise, tmp_path):
    """The shipped config class parses config.json into the attribute form vLLM's nemotron_nas reads."""
    model, tok = story_layerwise
    model.config.quantization_config = {"quant_method": "gguf"}   # what a model loaded from a .gguf carries
    export_vllm(model, tok, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())  # vLLM: "gguf"?
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert config.block_configs[1].ffn.intermediate_size == 269
    assert config.block_configs[1].attention.n_heads_in_group == 2 and not config.block_configs[0].ffn.no_op
    assert not hasattr(config.block_configs[1].ffn, "ffn_mult")
    assert json.loads(config.to_json_string())["block_configs"][1]["ffn"]["intermediate_size"] == 269


def test_uniform_widths_give_a_plain_checkpoint_in_bf16(story_llama_dir, tmp_path):
    model, tok = pruned_story(story_llama_dir, ratio=0.3, uniform=True)
    reference, _ = pruned_story(story_llama_dir, ratio=0.3, uniform=True)
    with torch.no_grad():   # the weights rounded to bf16; buffers (rotary frequencies) stay float32
        for p in reference.parameters():
            p.copy_(p.bfloat16().float())
    summary = export_vllm(model, tok, tmp_path / "out", outtype="bf16")
    assert summary["architecture"] == "LlamaForCausalLM" and summary["padding_bytes"] == 0
    assert not (tmp_path / "out" / "structure.json").exists()
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    # the same bf16 weights, computed in float32 on both sides: exactly the pruned model
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_refuses_bad_output_before_writing(story, tmp_path):
    model, tok = story
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_vllm(model, tok, tmp_path / "out")
    with pytest.raises(ValueError, match="outtype"):
        export_vllm(model, tok, tmp_path / "other", outtype="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
