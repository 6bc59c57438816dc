"""What an exporter needs to know about a loaded LLaMA-family model: which families export, the per-layer widths
(query heads, KV heads, MLP channels) read from the weights themselves, whether every layer has the same widths, and
the plain config such a model gets.

Widths come from the weight shapes, not from config.json, so the same code serves dense, mask-pruned (zeros in place,
full widths) and structurally pruned checkpoints (sparsefast.models.structural: each layer may keep a different
number of heads and channels). A model whose layers all have one set of widths is a plain `LlamaForCausalLM` /
`MistralForCausalLM` with a smaller config (`set_plain_config`); otherwise engines need a per-layer format:
llama.cpp's `deci` architecture (sparsefast.export.gguf) or vLLM's nemotron-nas `block_configs`
(sparsefast.export.vllm).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sparsefast.models.base import get_adapter

# families whose layers are exactly llama.cpp's `llama` / `deci` block (RMSNorm, rotary, SwiGLU, no biases);
# Mistral converts to llama.cpp's `llama` architecture as well
EXPORTABLE_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer's widths: query heads, key/value heads and MLP (intermediate) channels."""

    heads: int
    kv_heads: int
    ffn: int


def head_dim(model: nn.Module) -> int:
    """Channels per attention head (config.head_dim, else hidden / heads of the unpruned config)."""
    return get_adapter(model).head_dim(model)


def rope_theta(config) -> float:
    """The rotary base: transformers ≥ 5 keeps it in `rope_parameters`, older releases in `rope_theta`."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError (one line: what and what to do) unless `model` is a LLaMA-family model whose every layer
    llama.cpp and vLLM compute exactly as transformers does: SiLU MLP, no q/k/v/o or MLP biases, plain rotary
    positions (no rope scaling), no sliding window shorter than the context."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in EXPORTABLE_MODEL_TYPES:
        raise ValueError(f"export supports the LLaMA family ({', '.join(EXPORTABLE_MODEL_TYPES)}); this model is "
                         f"{model_type!r}: serve it with `sparsefast serve` instead")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not the SiLU of llama.cpp's llama block; "
                         "this model cannot be exported")
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not exported yet (only plain rotary positions); serve this "
                         "model with `sparsefast serve`")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        raise ValueError(f"sliding window {window} < context {config.max_position_embeddings}: the exported llama "
                         "architecture attends to the whole context; set sliding_window to null only if the model "
                         "was trained without it")
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name in adapter.linear_names:
            linear = layer.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"layer {i} {name} is a {type(linear).__name__}, not a dense Linear; export the "
                                 "checkpoint as saved (load it without swapping in sparse kernels)")
            if linear.bias is not None:
                raise ValueError(f"layer {i} {name} has a bias, which llama.cpp's llama block lacks; this model "
                                 "cannot be exported")


def layer_widths(model: nn.Module) -> list[LayerWidths]:
    """Per-layer widths read from the weights: q_proj rows / head_dim, k_proj rows / head_dim, gate_proj rows."""
    adapter = get_adapter(model)
    dim = head_dim(model)
    widths = []
    for layer in adapter.decoder_layers(model):
        q, k = (layer.get_submodule(n).out_features for n in adapter.attn_in[:2])
        ffn = layer.get_submodule(adapter.mlp_in[0]).out_features
        widths.append(LayerWidths(q // dim, k // dim, ffn))
    return widths


def uniform_widths(widths: list[LayerWidths]) -> LayerWidths | None:
    """The one set of widths every layer has, or None when layers differ."""
    return widths[0] if widths and all(w == widths[0] for w in widths) else None


def set_plain_config(model: nn.Module) -> LayerWidths:
    """Write a model whose layers all have the same widths into its own config (num_attention_heads,
    num_key_value_heads, intermediate_size, and an explicit head_dim, which hidden / heads no longer gives after
    heads were removed), so that save_pretrained writes a plain LlamaForCausalLM-family checkpoint any engine loads.
    Raises ValueError naming the first layer that differs."""
    widths = layer_widths(model)
    first = uniform_widths(widths)
    if first is None:
        i, odd = next((i, w) for i, w in enumerate(widths) if w != widths[0])
        raise ValueError(f"layer {i} has {odd.heads} heads / {odd.kv_heads} KV heads / {odd.ffn} MLP channels, "
                         f"layer 0 has {widths[0].heads} / {widths[0].kv_heads} / {widths[0].ffn}: a plain config "
                         "needs the same widths in every layer (prune with `prune-structured --uniform`)")
    config = model.config
    config.head_dim = head_dim(model)
    config.num_attention_heads = first.heads
    config.num_key_value_heads = first.kv_heads
    config.intermediate_size = first.ffn
    return first
