"""`sparsefast export MODEL --to vllm`: a model as a Hugging Face directory that vLLM serves
(`vllm serve DIR`, single GPU or `--tensor-parallel-size N`).

* Every layer with the same widths (dense, mask-pruned, `prune-structured --uniform`): the model's own plain
  `LlamaForCausalLM`-family config with those widths (`set_plain_config`), saved as a normal checkpoint.
* Layers with different widths: vLLM's `DeciLMForCausalLM` (model_type `nemotron-nas`, vllm/model_executor/models/
  nemotron_nas.py), which vLLM starts with `--trust-remote-code`: the directory carries its config class
  (sparsefast.export.decilm_config, as configuration_decilm.py; a config parser, no model code). Its config has one
  global `num_attention_heads` and per layer `block_configs[i]` with `attention.n_heads_in_group` (KV heads =
  num_attention_heads // n_heads_in_group) and `ffn.intermediate_size`.
  MLP widths are therefore exact per layer. Query heads are not per layer in that format, so a layer whose heads
  were pruned is zero-padded back to the model's original head and KV-head counts, which is exact: a padded query
  head has zero q rows (its attention output is some average of values) and zero o_proj columns (that output
  contributes nothing), and a padded KV head (kv_groups pruning) serves only padded query heads. The cost, in bytes
  of the weights written, is reported in sparsefast.json (`padding_bytes`): per padded head 2·head_dim·hidden
  values (q rows + o_proj columns), per padded KV head 2·head_dim·hidden (k and v rows); vLLM also computes those
  heads and keeps their KV cache, so attention keeps none of the pruning's speedup there and the MLP keeps all of
  it.

Weights are written as safetensors in `outtype` (f32, f16, bf16) with the tokenizer and a sparsefast.json, atomically
and exclusively through sparsefast.checkpoint's writers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsefast import __version__
from sparsefast.checkpoint import REPORT_NAME, OutputClaim, atomic_output_dir, save_checkpoint
from sparsefast.export import decilm_config
from sparsefast.export.architecture import (
    LayerWidths,
    check_exportable,
    head_dim,
    layer_widths,
    set_plain_config,
    uniform_widths,
)
from sparsefast.models.base import get_adapter
from sparsefast.ops.int8_rows import refuse_quantized

DECILM_CONFIG_MODULE = "configuration_decilm"  # the file name real nemotron-nas checkpoints use
OUTTYPE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_vllm(model: nn.Module, tokenizer: Any, out: str | os.PathLike | OutputClaim, *, outtype: str = "f32",
                overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                source: str | None = None) -> dict[str, Any]:
    """Write `model` + `tokenizer` as a vLLM-loadable directory `out` (module docstring); returns the summary also
    written to sparsefast.json. `out`: a path (claimed for the length of the export) or the OutputClaim the run took
    before loading the model (its overwrite and sources apply). Raises ValueError for a bad `out` or a model vLLM
    cannot run exactly, before anything is written. `model` is changed: cast to `outtype` (and, for equal widths,
    its config made plain)."""
    if outtype not in OUTTYPE_DTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPE_DTYPES)} for --to vllm")
    refuse_quantized(model, "export --to vllm")  # vLLM would not read the int8 scales
    if not isinstance(out, OutputClaim):
        with OutputClaim(out, overwrite, sources=sources) as claim:
            return export_vllm(model, tokenizer, claim, outtype=outtype, source=source)
    check_exportable(model)
    widths = layer_widths(model)
    model.to(OUTTYPE_DTYPES[outtype])
    report: dict[str, Any] = {"export": "vllm", "source": source, "outtype": outtype, "sparsefast": __version__,
                              "layers": [vars(w) for w in widths]}
    if uniform_widths(widths) is not None:
        set_plain_config(model)
        report.update(architecture=model.config.architectures[0] if model.config.architectures
                      else type(model).__name__, padding_bytes=0)
        save_checkpoint(model, tokenizer, out, report)
        return {"out": str(out.path), **{k: v for k, v in report.items() if k != "layers"}}
    config, state, padding = decilm_checkpoint(model, widths)
    report.update(architecture="DeciLMForCausalLM", padding_bytes=padding)
    with atomic_output_dir(out.path, overwrite=out.overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(Path(decilm_config.__file__), tmp / f"{DECILM_CONFIG_MODULE}.py")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return {"out": str(out.path), **{k: v for k, v in report.items() if k != "layers"}}


def decilm_checkpoint(model: nn.Module, widths: list[LayerWidths]) -> tuple[dict, dict[str, torch.Tensor], int]:
    """(config.json dict, state dict, padding bytes) of `model` as a DeciLMForCausalLM / nemotron-nas checkpoint:
    query and KV heads zero-padded to the config's counts, MLP widths exact per layer (module docstring)."""
    cfg = model.config
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    group, dim = heads // kv_heads, head_dim(model)
    adapter = get_adapter(model)
    embedding = adapter.embeddings(model)[0].weight
    state = {"model.embed_tokens.weight": embedding, "model.norm.weight": adapter.final_norm(model).weight}
    head = adapter.lm_head(model).weight
    tied = head.data_ptr() == embedding.data_ptr()
    if not tied:
        state["lm_head.weight"] = head
    padding = 0
    blocks = []
    for i, (layer, w) in enumerate(zip(adapter.decoder_layers(model), widths)):
        prefix = f"model.layers.{i}."
        if w.kv_heads > kv_heads or w.heads % w.kv_heads or w.heads // w.kv_heads > group:
            raise ValueError(f"layer {i}: {w.heads} query heads over {w.kv_heads} KV heads do not fit the model's "
                             f"{heads}/{kv_heads} grouping; vLLM's nemotron-nas format cannot hold this layer")
        attn = {name: layer.get_submodule(f"self_attn.{name}").weight for name in ("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj")}
        state[prefix + "self_attn.q_proj.weight"] = _pad_rows(attn["q_proj"], w, heads, kv_heads, dim, grouped=True)
        state[prefix + "self_attn.k_proj.weight"] = _pad_rows(attn["k_proj"], w, heads, kv_heads, dim, grouped=False)
        state[prefix + "self_attn.v_proj.weight"] = _pad_rows(attn["v_proj"], w, heads, kv_heads, dim, grouped=False)
        state[prefix + "self_attn.o_proj.weight"] = _pad_rows(attn["o_proj"].t(), w, heads, kv_heads, dim,
                                                              grouped=True).t()
        padding += 2 * ((heads - w.heads) + (kv_heads - w.kv_heads)) * dim * cfg.hidden_size
        for name in ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            state[prefix + name + ".weight"] = layer.get_submodule(name).weight
        blocks.append({"attention": {"n_heads_in_group": group, "no_op": False, "replace_with_linear": False},
                       "ffn": {"intermediate_size": w.ffn, "no_op": False, "replace_with_linear": False}})
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    # a model loaded from a .gguf keeps transformers' GGUF quantization entry; its weights here are plain floats
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("architectures", "model_type",
                                                                   "quantization_config")}
    config.update(architectures=["DeciLMForCausalLM"], model_type="nemotron-nas", block_configs=blocks,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim, tie_word_embeddings=tied,
                  attention_bias=False, mlp_bias=False, intermediate_size=max(w.ffn for w in widths),
                  auto_map={"AutoConfig": f"{DECILM_CONFIG_MODULE}.DeciLMConfig"})
    config["dtype"] = config["torch_dtype"] = str(embedding.dtype).removeprefix("torch.")
    return config, state, padding * embedding.element_size()


def _pad_rows(weight: torch.Tensor, w: LayerWidths, heads: int, kv_heads: int, dim: int, *,
              grouped: bool) -> torch.Tensor:
    """Rows of one layer's q (grouped: [w.heads·dim, in], query head j of KV group g at row block g·r + j,
    r = w.heads / w.kv_heads) or k/v ([w.kv_heads·dim, in]) placed into zeros of the full shape: query head j of
    group g goes to g·(heads / kv_heads) + j, KV head g to g."""
    cols = weight.shape[1]
    if grouped:
        full = weight.new_zeros(kv_heads, heads // kv_heads, dim, cols)
        full[:w.kv_heads, :w.heads // w.kv_heads] = weight.reshape(w.kv_heads, w.heads // w.kv_heads, dim, cols)
    else:
        full = weight.new_zeros(kv_heads, dim, cols)
        full[:w.kv_heads] = weight.reshape(w.kv_heads, dim, cols)
    return full.reshape(-1, cols)
