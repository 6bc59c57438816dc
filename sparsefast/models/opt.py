"""OPT adapter (`opt`, Zhang et al. 2022): the model SparseGPT and Wanda also report.

Layout: `model.decoder.layers[i].{self_attn.{q,k,v,out}_proj, fc1, fc2}`, all linears with biases, LayerNorm, and a
learned positional embedding (`embed_positions`, offset by 2). OPT-350m projects between a 512-wide embedding and the
1024-wide decoder (`project_in` / `project_out`) and normalises after each block (`do_layer_norm_before=False`), so it
has no final norm; both variants are handled.
"""

from __future__ import annotations

from sparsefast.models.base import ModelAdapter, register_adapter


@register_adapter
class OPTAdapter(ModelAdapter):
    """Adapter for `OPTForCausalLM` (multi-head attention, no GQA)."""

    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    pre_layer_paths = ("model.decoder.project_in",)
    final_norm_path = "model.decoder.final_layer_norm"
    post_layer_paths = ("model.decoder.project_out",)
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = ("self_attn.out_proj",)
    mlp_in = ("fc1",)
    mlp_out = ("fc2",)
    attn_norm = "self_attn_layer_norm"
    mlp_norm = "final_layer_norm"
