"""LLaMA family adapter: LLaMA 1/2/3 (`llama`), Mistral (`mistral`) and Qwen2 (`qwen2`).

All three share the transformers layout `model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}` with
RMSNorm before attention and MLP, rotary positions (no positional embedding module with weights) and grouped-query
attention (`num_key_value_heads` ≤ `num_attention_heads`). Qwen2 adds biases on q/k/v; Mistral's sliding window does
not change the structure.
"""

from __future__ import annotations

from sparsefast.models.base import ModelAdapter, register_adapter


@register_adapter
class LlamaAdapter(ModelAdapter):
    """Adapter for `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`."""

    model_types = ("llama", "mistral", "qwen2")
    layers_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    final_norm_path = "model.norm"
    rotary_path = "model.rotary_emb"
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = ("self_attn.o_proj",)
    mlp_in = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out = ("mlp.down_proj",)
    attn_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
