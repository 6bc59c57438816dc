"""sparsefast.models.base: the adapters of all five families on tiny random models (layers, linears, embeddings,
head, GQA structure hints), per-layer head counts after slicing, unsupported architectures, adapter mismatch."""

from __future__ import annotations

import pytest
from torch import nn

from sparsefast.models import get_adapter, supported_model_types
from tests.conftest import TINY_FAMILIES, tiny_model

# expected per-layer linears: name → (out_features, in_features) for hidden 64, intermediate 128, 4 heads, 2 kv heads
LLAMA_LINEARS = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64), "mlp.down_proj": (64, 128),
}
EXPECTED = {
    "llama": LLAMA_LINEARS,
    "mistral": LLAMA_LINEARS,
    "qwen2": LLAMA_LINEARS,
    "opt": {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 64), "self_attn.v_proj": (64, 64),
            "self_attn.out_proj": (64, 64), "fc1": (128, 64), "fc2": (64, 128)},
    "gpt_neox": {"attention.query_key_value": (192, 64), "attention.dense": (64, 64),
                 "mlp.dense_h_to_4h": (128, 64), "mlp.dense_4h_to_h": (64, 128)},
}
KV_HEADS = {"llama": 2, "mistral": 2, "qwen2": 2, "opt": 4, "gpt_neox": 4}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layers_and_linears(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.num_hidden_layers == 2
    for layer in layers:
        linears = adapter.prunable_linears(layer)
        assert list(linears) == list(EXPECTED[family])  # execution order: attn_in, attn_out, mlp_in, mlp_out
        assert {n: tuple(m.weight.shape) for n, m in linears.items()} == EXPECTED[family]
        assert all(layer.get_submodule(n) is m for n, m in linears.items())
    assert set(adapter.linear_names) == set(EXPECTED[family])
    assert adapter.attn_in + adapter.attn_out + adapter.mlp_in + adapter.mlp_out == adapter.linear_names


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_embeddings_head_norm_never_prunable(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    embeddings = adapter.embeddings(model)
    assert isinstance(embeddings[0], nn.Embedding) and embeddings[0].weight.shape == (256, 64)
    assert len(embeddings) == (2 if family == "opt" else 1)  # OPT has a learned positional embedding
    head = adapter.lm_head(model)
    assert head is model.get_output_embeddings()
    assert adapter.final_norm(model).weight.shape == (64,)
    excluded = {id(m) for m in embeddings + [head]}
    prunable = [m for layer in adapter.decoder_layers(model) for m in adapter.prunable_linears(layer).values()]
    assert not excluded & {id(m) for m in prunable}
    # every nn.Linear of every decoder layer is covered: nothing prunable is silently skipped
    for layer in adapter.decoder_layers(model):
        all_linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        assert all_linears == set(adapter.prunable_linears(layer))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pre_layer_layers_post_layer_cover_every_parameter(family):
    """pre_layer_modules + decoder layers + post_layer_modules hold every parameter of the model (what a
    layer-sequential engine must place on the device at some point)."""
    model = tiny_model(family)
    adapter = get_adapter(model)
    n_params = sum(p.numel() for p in model.parameters())
    parts = adapter.pre_layer_modules(model) + list(adapter.decoder_layers(model)) + adapter.post_layer_modules(model)
    seen, covered = set(), 0
    for part in parts:
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                covered += p.numel()
    assert covered == n_params


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_structure_hints(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    assert adapter.num_heads(model) == 4
    assert adapter.num_kv_heads(model) == KV_HEADS[family]
    assert adapter.head_dim(model) == 16
    assert adapter.max_context(model) == 256
    layer = adapter.decoder_layers(model)[0]
    assert adapter.num_heads(model, layer) == 4
    assert adapter.num_kv_heads(model, layer) == KV_HEADS[family]
    assert adapter.fused_qkv == (family == "gpt_neox")


def test_per_layer_heads_follow_sliced_weights():
    """After a structural pruner drops heads, counts come from the layer, not the (stale) config."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[1]
    attn = layer.self_attn
    attn.q_proj = nn.Linear(64, 32, bias=False)  # 2 of 4 query heads kept
    attn.k_proj = nn.Linear(64, 16, bias=False)  # 1 of 2 kv heads kept
    assert adapter.num_heads(model, layer) == 2 and adapter.num_kv_heads(model, layer) == 1
    assert adapter.num_heads(model) == 4


def test_unsupported_architecture_lists_supported():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'") as info:
        get_adapter(model)
    for name in ("llama", "mistral", "qwen2", "opt", "gpt_neox"):
        assert name in str(info.value)
    assert set(supported_model_types()) == {"llama", "mistral", "qwen2", "opt", "gpt_neox"}
    with pytest.raises(ValueError, match="unsupported architecture"):
        get_adapter(nn.Linear(2, 2))


def test_adapter_mismatch_is_an_error():
    model = tiny_model("llama")
    layer = get_adapter(tiny_model("opt")).decoder_layers(tiny_model("opt"))[0]
    with pytest.raises(ValueError, match="does not match"):
        get_adapter(model).prunable_linears(layer)
