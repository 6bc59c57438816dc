"""`sparsefast export MODEL --to vllm-sparse --out DIR`: a mask-pruned model as a vLLM checkpoint whose sparse linears
are stored packed, served by vLLM through sparsefast's plugin (sparsefast.vllm_plugin) with sparsefast's kernels.

vLLM has no sparse linear of its own (its 2:4 kernels were removed; unstructured sparsity never ran sparse there),
but it loads third-party weight layouts through a quantization method. This format is one:

* config.json: the model's plain LlamaForCausalLM-family config (every layer the same widths) with
  `"quantization_config": {"quant_method": "sparsefast", "format_version": 1, "values_dtype": "float32" |
  "bfloat16", "layers": {NAME: {"layout": L, "shape": [out, in]}}}`, NAME a checkpoint linear
  (`model.layers.0.self_attn.q_proj`), L "2:4" or "unstructured".
  vLLM reads `quant_method` and hands the dict to the plugin; every linear not listed is dense.
* model.safetensors: a listed linear stores, instead of `NAME.weight`, the packed tensors of the CPU kernels'
  layouts, named as sparsefast.nn.SparseLinear's buffers: 2:4 `NAME.values` [N_p/8, K_p/32, 8, 16] + `NAME.meta`
  int32 (sparsefast.ops.sparse24_cpu); unstructured `NAME.values` [nnz + 16] + `NAME.mask` int16 [N_p/8, K_p/16, 8]
  + `NAME.tile_offsets` int64 [N_p/8 + 1] (sparsefast.ops.sparse_unstructured). Both unpack exactly to the weight.
  Everything else (embeddings, norms, the head, dense linears) as in a plain checkpoint.

Which linears are packed, and how: vLLM runs q/k/v as one layer (qkv_proj) and gate/up as one (gate_up_proj), so a
group gets one layout. Each linear's layout is what `sparsefast serve` would run on this machine (the timed choice of
sparsefast.nn.sparsify.choose_sparse_layer; `calibrate=False`: 2:4 where the weight fits, else unstructured, untimed);
a group takes the layout that most of its weights chose, and is dense where most chose dense or a member cannot be
stored in it (a 2:4 layout needs every member 2:4; a weight under MIN_SPARSITY zeros stays dense). The tied head and
the embeddings stay dense.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsefast import __version__
from sparsefast.checkpoint import REPORT_NAME, OutputClaim, atomic_output_dir
from sparsefast.export import VLLM_SPARSE_OUTTYPES
from sparsefast.export.architecture import check_exportable, set_plain_config
from sparsefast.export.vllm import OUTTYPE_DTYPES
from sparsefast.models.base import get_adapter
from sparsefast.nn.sparse_linear import LAYOUTS, PACKED_NAMES  # the layouts and their tensors' names, as SparseLinear's
from sparsefast.ops.int8_rows import refuse_quantized

QUANT_METHOD = "sparsefast"  # the quantization_config quant_method that selects the plugin
FORMAT_VERSION = 1
INDEX_DTYPES = {"meta": torch.int32, "mask": torch.int16, "tile_offsets": torch.int64}  # the values: the weight's
# checkpoint linears vLLM's Llama runs as one layer: (fused layer name, members in vLLM's order)
FUSED_LAYERS = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def pack(weight: torch.Tensor, layout: str) -> tuple[torch.Tensor, ...]:
    """The packed tensors (PACKED_NAMES[layout] order) of a dense-with-zeros weight [out, in]."""
    from sparsefast.ops.sparse24_cpu import pack_sparse24_cpu
    from sparsefast.ops.sparse_unstructured import pack_sparse_unstructured

    if layout == "2:4":
        return pack_sparse24_cpu(weight)
    if layout == "unstructured":
        return pack_sparse_unstructured(weight)
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def unpack(packed: tuple[torch.Tensor, ...], layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """The exact inverse of `pack`: the weight [out_features, in_features] with zeros in place."""
    from sparsefast.ops.sparse24_cpu import unpack_sparse24_cpu
    from sparsefast.ops.sparse_unstructured import unpack_sparse_unstructured

    if layout == "2:4":
        return unpack_sparse24_cpu(*packed, out_features, in_features)
    if layout == "unstructured":
        return unpack_sparse_unstructured(*packed, out_features, in_features)
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def linear_groups(model: nn.Module) -> list[list[str]]:
    """The decoder linears as vLLM runs them: lists of checkpoint module names, one list per vLLM layer (q/k/v
    together, gate/up together, o and down alone)."""
    adapter = get_adapter(model)
    module_names = {id(m): n for n, m in model.named_modules()}
    fused = {member: members for _, members in FUSED_LAYERS for member in members}
    groups: list[list[str]] = []
    for layer in adapter.decoder_layers(model):
        base, done = module_names[id(layer)], set()
        for rel in adapter.linear_names:
            if rel in done:
                continue
            parent, _, leaf = rel.rpartition(".")
            members = [f"{parent}.{m}" if parent else m for m in fused.get(leaf, (leaf,))]
            done.update(members)
            groups.append([f"{base}.{m}" for m in members])
    return groups


def choose_layouts(model: nn.Module, *, calibrate: bool = True) -> dict[str, str]:
    """{checkpoint linear name: layout} of the linears to store packed (module docstring's rule)."""
    from sparsefast.nn.sparsify import MIN_SPARSITY, choose_sparse_layer
    from sparsefast.ops.sparse24 import is_sparse24
    from sparsefast.ops.sparse_unstructured import weight_sparsity

    layouts: dict[str, str] = {}
    for names in linear_groups(model):
        linears = [model.get_submodule(n) for n in names]
        votes: dict[str, int] = {}
        for linear in linears:
            weight = linear.weight.detach()
            chosen = "dense"
            if weight_sparsity(weight) >= MIN_SPARSITY:
                chosen = choose_sparse_layer(linear, calibrate=calibrate)[1]["chosen"]
            votes[chosen] = votes.get(chosen, 0) + weight.numel()
        layout = max(votes, key=votes.get)
        weights = [linear.weight.detach() for linear in linears]
        if layout == "2:4" and not all(is_sparse24(w) for w in weights):
            layout = "unstructured"
        if layout == "unstructured" and min(weight_sparsity(w) for w in weights) < MIN_SPARSITY:
            layout = "dense"
        if layout != "dense":
            layouts.update(dict.fromkeys(names, layout))
    return layouts


def export_vllm_sparse(model: nn.Module, tokenizer: Any, out: str | os.PathLike | OutputClaim, *,
                       outtype: str = "f32", calibrate: bool = True, overwrite: bool = False,
                       sources: Iterable[str | os.PathLike] = (), source: str | None = None) -> dict[str, Any]:
    """Write `model` + `tokenizer` to directory `out` in the format above; returns the summary also written to
    sparsefast.json (packed layers per layout, bytes of the weights as stored and as dense). `out`: a path (claimed
    for the length of the export) or the OutputClaim the run took before loading the model. Raises ValueError, before
    anything is written, for an outtype the kernels do not take or a model vLLM's plain config cannot describe.
    `model` is changed: cast to `outtype`, its config made plain."""
    if outtype not in VLLM_SPARSE_OUTTYPES:
        raise ValueError(f"--to vllm-sparse writes {', '.join(VLLM_SPARSE_OUTTYPES)} (the CPU kernels' dtypes); got "
                         f"{outtype!r}")
    refuse_quantized(model, "export --to vllm-sparse")  # the plugin's layouts hold float values
    if not isinstance(out, OutputClaim):
        with OutputClaim(out, overwrite, sources=sources) as claim:
            return export_vllm_sparse(model, tokenizer, claim, outtype=outtype, calibrate=calibrate, source=source)
    check_exportable(model)
    set_plain_config(model)
    model.to(OUTTYPE_DTYPES[outtype])
    layouts = choose_layouts(model, calibrate=calibrate)
    state = {k: v for k, v in model.state_dict().items()}
    cfg = model.config
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # vLLM ties it to the embedding, as the config says
    layers: dict[str, dict[str, Any]] = {}
    stored = dense = 0
    for name, layout in layouts.items():
        weight = state.pop(f"{name}.weight")
        for tensor_name, tensor in zip(PACKED_NAMES[layout], pack(weight, layout)):
            state[f"{name}.{tensor_name}"] = tensor
            stored += tensor.numel() * tensor.element_size()
        dense += weight.numel() * weight.element_size()
        layers[name] = {"layout": layout, "shape": list(weight.shape)}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = {k: v for k, v in cfg.to_dict().items() if k != "quantization_config"}  # GGUF's entry: floats here
    config["dtype"] = config["torch_dtype"] = str(OUTTYPE_DTYPES[outtype]).removeprefix("torch.")
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                     "values_dtype": config["dtype"], "layers": layers}
    counts = {layout: sum(v["layout"] == layout for v in layers.values()) for layout in LAYOUTS}
    report = {"export": "vllm-sparse", "source": source, "outtype": outtype, "sparsefast": __version__,
              "calibrated": calibrate, "packed_layers": counts,
              "packed_bytes": stored, "packed_dense_bytes": dense, "layouts": layouts}
    with atomic_output_dir(out.path, overwrite=out.overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return {"out": str(out.path), **{k: v for k, v in report.items() if k != "layouts"}}


def rank_slice(weight: torch.Tensor, *, rank: int, row_parallel: bool, size: int, kv_replicas: int = 1) -> torch.Tensor:
    """The part of one member's weight [out, in] that tensor-parallel rank `rank` holds, as vLLM shards its linears:
    a row-parallel layer (o_proj, down_proj) splits the input columns, `size` per rank; a column-parallel one
    (qkv_proj, gate_up_proj) splits each member's output rows, `size` per rank, where a K/V member shared by
    `kv_replicas` ranks (more ranks than KV heads) is the same for each of them. The plugin packs the concatenation
    of a layer's members' slices, so any split whose column count keeps 4-groups whole (2:4) works."""
    if row_parallel:
        return weight[:, rank * size:(rank + 1) * size]
    start = (rank // kv_replicas) * size
    return weight[start:start + size]
