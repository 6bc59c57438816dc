"""`sparsefast export MODEL --to gguf`: a LLaMA-family model (dense, mask-pruned or structurally pruned) as one GGUF
file for llama.cpp / Ollama, written with the `gguf` package (the writer of llama.cpp's own converter).

Architecture: llama.cpp's `llama` when every layer has the same widths (dense, mask-pruned, `prune-structured
--uniform`); its `deci` architecture otherwise, whose `head_count`, `head_count_kv` and `feed_forward_length` are
per-layer arrays, so each layer keeps exactly the heads and MLP channels pruning left it (no padding). Both
architectures run the same block (RMSNorm, rotary, GQA attention, SwiGLU MLP).

Tensors follow convert_hf_to_gguf.py: GGUF names (`blk.N.attn_q.weight`, ...), q/k rows permuted from transformers'
half-split rotary layout to llama.cpp's interleaved pairs (per layer, with that layer's head counts), no `output`
tensor when the head is tied to the embedding. `outtype` sets the 2-D weights: f32, f16, bf16, q8_0 or q4_1 (the
block types: blocks of 32 along a row; a tensor whose rows are not a multiple of 32, e.g. down_proj of an MLP pruned
to 1229 channels, would fall back to f16, as the converter does, so they zero-pad each layer's MLP to a multiple of 32
channels instead: zero gate/up rows and zero down_proj columns add exactly nothing, silu(0)·0 = 0, and cost a few
bytes, e.g. 1228 → 1248 channels); 1-D norms are always f32. Zeros of a mask-pruned model stay exact zeros in every
outtype but q4_1 (a block's minimum offsets its grid), and llama.cpp computes them densely: only structural pruning
makes it faster. q4_1 is the type SmolLM2's own GGUF ships in.

Metadata: the model's hyper-parameters, the tokenizer and chat template (sparsefast.export.gguf_vocab), and
`sparsefast.version`, which marks the file as sparsefast's (what --overwrite may replace). The file is written
atomically and exclusively (sparsefast.export.output).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from sparsefast import __version__
from sparsefast.export import OUTTYPES
from sparsefast.export.architecture import (
    LayerWidths,
    check_exportable,
    head_dim,
    layer_widths,
    rope_theta,
    uniform_widths,
)
from sparsefast.export.gguf_vocab import add_tokenizer
from sparsefast.export.output import atomic_output_file, check_output_path
from sparsefast.models.base import get_adapter

OWNER_KEY = "sparsefast.version"
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
_TENSOR_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
                 "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
BLOCK_TYPES = ("q8_0", "q4_1")  # outtypes quantized in blocks along a row (module docstring: MLP padding)
# the MLP padding: whole blocks of every BLOCK_TYPES type along a row (32 weights for both)
QUANT_BLOCK = math.lcm(*(gguf.GGML_QUANT_SIZES[_TENSOR_TYPES[t]][0] for t in BLOCK_TYPES))
# transformers' per-layer module → GGUF tensor name (after `blk.N.`), LLaMA family (sparsefast.models.llama)
_LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def is_sparsefast_gguf(path: Path) -> bool:
    """True when `path` is a GGUF file whose metadata carries sparsefast's mark (OWNER_KEY)."""
    try:
        return OWNER_KEY in gguf.GGUFReader(path).fields
    except (OSError, ValueError, IndexError):
        return False


def check_gguf_output(out: str | os.PathLike, *, overwrite: bool = False, outtype: str = "f32",
                      sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Everything about a GGUF export that can be checked before the model is loaded; returns the output path."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return check_output_path(out, overwrite=overwrite, is_own_file=is_sparsefast_gguf, sources=sources, what="gguf")


def export_gguf(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, outtype: str = "f32",
                overwrite: bool = False, sources: Iterable[str | os.PathLike] = (), name: str | None = None) -> Path:
    """Write `model` (a loaded LLaMA-family *ForCausalLM, any checkpoint kind) and `tokenizer` to the GGUF file
    `out`; returns its path. Raises ValueError for a bad output or a model llama.cpp cannot run exactly
    (check_exportable), before anything is written."""
    path = check_gguf_output(out, overwrite=overwrite, outtype=outtype, sources=sources)
    check_exportable(model)
    widths = layer_widths(model)
    if outtype in BLOCK_TYPES:  # whole blocks along down_proj's rows (module docstring)
        widths = [dataclasses.replace(w, ffn=-(-w.ffn // QUANT_BLOCK) * QUANT_BLOCK) for w in widths]
    arch = "llama" if uniform_widths(widths) is not None else "deci"
    with atomic_output_file(path, overwrite=overwrite, is_own_file=is_sparsefast_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _add_hyperparameters(writer, model, widths, outtype, name or path.stem)
        add_tokenizer(writer, tokenizer, get_adapter(model).embeddings(model)[0].weight.shape[0])
        for tensor_name, weight in _gguf_tensors(model, widths):
            _add_tensor(writer, tensor_name, weight, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _add_hyperparameters(writer: gguf.GGUFWriter, model: nn.Module, widths: list[LayerWidths], outtype: str,
                         name: str) -> None:
    cfg = model.config
    uniform = uniform_widths(widths)

    def per_layer(field: str) -> int | list[int]:
        return getattr(uniform, field) if uniform is not None else [getattr(w, field) for w in widths]

    dim = head_dim(model)
    writer.add_name(name)
    writer.add_string(OWNER_KEY, __version__)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(len(widths))
    writer.add_feed_forward_length(per_layer("ffn"))
    writer.add_head_count(per_layer("heads"))
    writer.add_head_count_kv(per_layer("kv_heads"))
    writer.add_key_length(dim)      # explicit: hidden / heads no longer gives head_dim once heads are removed
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_rope_freq_base(rope_theta(cfg))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(get_adapter(model).embeddings(model)[0].weight.shape[0]))
    writer.add_file_type(_FILE_TYPES[outtype])
    if outtype in BLOCK_TYPES:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rotary_rows_to_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows [heads·head_dim, in] from transformers' rotary layout (each head's first half of rows pairs with
    its second half) to llama.cpp's (consecutive rows pair up): per head, row i of half 0/1 goes to 2i / 2i+1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model: nn.Module, widths: list[LayerWidths]) -> Iterable[tuple[str, torch.Tensor]]:
    """(GGUF name, weight) for every tensor llama.cpp reads, in its order."""
    adapter = get_adapter(model)
    embedding = adapter.embeddings(model)[0].weight
    yield "token_embd.weight", embedding
    for i, (layer, w) in enumerate(zip(adapter.decoder_layers(model), widths)):
        for module, short in _LAYER_TENSORS.items():
            weight = layer.get_submodule(module).weight
            if short == "attn_q":
                weight = rotary_rows_to_gguf(weight, w.heads)
            elif short == "attn_k":
                weight = rotary_rows_to_gguf(weight, w.kv_heads)
            elif short in ("ffn_gate", "ffn_up") and weight.shape[0] < w.ffn:
                weight = torch.nn.functional.pad(weight, (0, 0, 0, w.ffn - weight.shape[0]))  # zero channels
            elif short == "ffn_down" and weight.shape[1] < w.ffn:
                weight = torch.nn.functional.pad(weight, (0, w.ffn - weight.shape[1]))
            yield f"blk.{i}.{short}.weight", weight
    yield "output_norm.weight", adapter.final_norm(model).weight
    head = adapter.lm_head(model).weight
    if head.data_ptr() != embedding.data_ptr():  # tied: llama.cpp reuses token_embd
        yield "output.weight", head


def _add_tensor(writer: gguf.GGUFWriter, name: str, weight: torch.Tensor, outtype: str) -> None:
    data = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    if data.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    qtype = _TENSOR_TYPES[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        qtype = gguf.GGMLQuantizationType.F16  # rows not made of whole blocks: the converter's fallback
    if qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
