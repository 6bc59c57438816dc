"""GPT-NeoX adapter (`gpt_neox`: Pythia, GPT-NeoX-20B, ...).

Layout: `gpt_neox.layers[i].{attention.{query_key_value, dense}, mlp.{dense_h_to_4h, dense_4h_to_h}}` with biases,
LayerNorm and (by default) a parallel residual: attention and MLP both read the layer input through their own norm.
q, k and v come from ONE fused linear whose output rows are ordered per head: rows
[h·3·d, h·3·d + d) are head h's query, the next d its key, the next d its value (d = head_dim), as
`GPTNeoXAttention` views the output as (..., heads, 3·d) and chunks the last dim in three. No GQA.
"""

from __future__ import annotations

from torch import nn

from sparsefast.models.base import ModelAdapter, register_adapter


@register_adapter
class GPTNeoXAdapter(ModelAdapter):
    """Adapter for `GPTNeoXForCausalLM` (the head is `embed_out` before transformers 5, `lm_head` after)."""

    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    embedding_paths = ("gpt_neox.embed_in",)
    final_norm_path = "gpt_neox.final_layer_norm"
    lm_head_paths = ("lm_head", "embed_out")
    rotary_path = "gpt_neox.rotary_emb"
    attn_in = ("attention.query_key_value",)
    attn_out = ("attention.dense",)
    mlp_in = ("mlp.dense_h_to_4h",)
    mlp_out = ("mlp.dense_4h_to_h",)
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    fused_qkv = True
    qkv_layout = "per_head_qkv"

    def _q_rows(self, layer: nn.Module) -> int:
        # the fused projection holds q, k and v for every head: a third of its rows are queries
        return layer.get_submodule(self.attn_in[0]).out_features // 3

    def _k_rows(self, layer: nn.Module) -> int:
        return self._q_rows(layer)
