"""`fuse_linears`: linears that read the same input (q/k/v, gate/up) as one wider linear, one kernel call instead of
several.

At decode (a few tokens) a linear of a small model is a short weight stream plus a fixed cost per call: the op
dispatch, the thread team's fork and join, a cold start of the stream. Measured on the 2-core Xeon (ad-hoc, M = 1,
weights from DRAM, 2 threads, medians of 200 interleaved calls): SmolLM2's q, k, v (576+192+192 rows x 576) as three
calls 72.7 µs in bf16 2:4, as one call 40.3; gate and up (2 x 1536 x 576) 153.7 vs 93.6; the dense kernel 91.2 vs 56.3
and 215.0 vs 172.4. A 30-layer step makes 210 such calls; fused, 150. End to end the gain is much smaller than
these sums: SmolLM2 compiled decode 0-6% faster (dense fp32 level, bf16 and 2:4 +5%; 2 interleaved rounds,
bench/results/2026-12-06-cpu-fused-projections-ab.txt).

The fused layer is memory-neutral: its weight (or packed tensors) is the concatenation along the output rows, and
each part's own tensors are re-pointed to its rows of that buffer (views, same values), so the model's own forward,
its state dict and a checkpoint written from it are unchanged.

What fuses: parts of the same kind, dtype and device, reading the same input width, with all or none of them biased:
* plain `nn.Linear` / `DenseCpuLinear` (the fused layer has the type of the parts; int8 `DenseCpuLinear`s, all or
  none, fuse their int8 q and scales too);
* `SparseLinear`s of one layout (2:4 or unstructured), each part's out_features a multiple of the 8-row tile (the
  packed tiles then concatenate), the dense copy kept by all or none of them, int8 values (with their scales) in all
  or none. Their dispatch tables (measured per shape at swap time) are combined: the fused layer runs the kernel for
  the token counts where every part's table chose it, dense elsewhere. Unstructured parts' value streams are joined
  whole, each with its 16 zeros of padding, and the fused layer gets tile offsets of its own that step over them
  (a tile may end before the next one starts: sparsefast.ops.sparse_unstructured).
Anything else (mixed kinds, CUDA 2:4 layers, LoRA wrappers, ...) returns None and runs part by part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sparsefast.nn.dense_linear import DenseCpuLinear
from sparsefast.nn.dispatch import DispatchTable
from sparsefast.nn.sparse_linear import SparseLinear
from sparsefast.ops.int8_rows import SCALE_BUFFER
from sparsefast.ops.sparse24_cpu import TILE_ROWS

__all__ = ["fuse_linears"]


def fuse_linears(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([p(x) for p in parts], -1), sharing the parts' memory, or None when the
    parts cannot be fused (above). The parts' tensors become views of the fused buffers."""
    if len(parts) < 2 or not _compatible(parts):
        return None
    if type(parts[0]) is SparseLinear:
        return _fuse_sparse(parts)
    return _fuse_dense(parts)


def _compatible(parts: Sequence[nn.Module]) -> bool:
    kind = type(parts[0])
    if kind not in (nn.Linear, DenseCpuLinear, SparseLinear) or any(type(p) is not kind for p in parts):
        return False
    first = parts[0]
    tensor = first.values if kind is SparseLinear else first.weight
    if any(p.in_features != first.in_features or (p.bias is None) != (first.bias is None) for p in parts):
        return False
    if len({_scales(p) is None for p in parts}) != 1:  # int8 parts fuse only with int8 parts
        return False
    for p in parts:
        t = p.values if kind is SparseLinear else p.weight
        if t.dtype != tensor.dtype or t.device != tensor.device:
            return False
    if kind is SparseLinear:
        return (all(p.layout == first.layout for p in parts)
                and all(p.out_features % TILE_ROWS == 0 for p in parts)
                and len({p.dense is None for p in parts}) == 1)
    return True


def _scales(part: nn.Module) -> torch.Tensor | None:
    """An int8 part's per-row scales (SparseLinear.scales, DenseCpuLinear's weight_scale), else None."""
    if type(part) is SparseLinear:
        return part.scales
    return getattr(part, SCALE_BUFFER, None) if type(part) is DenseCpuLinear else None


def _concat_rows(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The concatenation along dim 0 and each input's rows of it (views)."""
    fused = torch.cat([t.detach() for t in tensors])
    views, start = [], 0
    for t in tensors:
        views.append(fused[start:start + t.shape[0]])
        start += t.shape[0]
    return fused, views


def _fused_bias(parts: Sequence[nn.Module]) -> torch.Tensor | None:
    if parts[0].bias is None:
        return None
    fused, views = _concat_rows([p.bias for p in parts])
    for p, v in zip(parts, views):
        if isinstance(p.bias, nn.Parameter):
            p.bias.data = v
        else:  # SparseLinear's bias buffer
            p.bias = v
    return fused


def _fuse_dense(parts: Sequence[nn.Module]) -> nn.Module:
    fused_w, views = _concat_rows([p.weight for p in parts])
    for p, v in zip(parts, views):
        p.weight.data = v
    bias = _fused_bias(parts)
    layer = nn.Linear(parts[0].in_features, fused_w.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(fused_w, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    if type(parts[0]) is not DenseCpuLinear:
        return layer
    fused = DenseCpuLinear.from_linear(layer)
    if _scales(parts[0]) is not None:  # int8 parts: their q and scales concatenate as the weights did
        scales, scale_views = _concat_rows([_scales(p) for p in parts])
        q, q_views = _concat_rows([p.qweight for p in parts])
        for p, sv, qv in zip(parts, scale_views, q_views):
            setattr(p, SCALE_BUFFER, sv)
            p.qweight = qv
        fused.register_buffer(SCALE_BUFFER, scales)
        fused.register_buffer("qweight", q, persistent=False)
    for p in parts:
        p._routes = {}  # a route captured the old tensors
    return fused


def _fuse_sparse(parts: Sequence[SparseLinear]) -> SparseLinear:
    first = parts[0]
    if first.layout == "2:4":
        meta, meta_views = _concat_rows([p.meta for p in parts])
        for p, m in zip(parts, meta_views):
            p.meta = m
        structure: tuple[torch.Tensor, ...] = (meta,)
    else:  # unstructured: masks concatenate by tiles; each part's tile offsets shift past the values before it
        shifted, start = [], 0
        for p in parts:
            shifted.append(p.tile_offsets[:-1] + start)
            start += p.values.shape[0]
        offsets = torch.cat([*shifted, parts[-1].tile_offsets[-1:] + (start - parts[-1].values.shape[0])])
        mask, mask_views = _concat_rows([p.mask for p in parts])
        for p, m in zip(parts, mask_views):
            p.mask = m
        structure = (mask, offsets)
    values, value_views = _concat_rows([p.values for p in parts])
    for p, v in zip(parts, value_views):
        p.values = v
    dense = None
    if first.dense is not None:
        dense, dense_views = _concat_rows([p.dense for p in parts])
        for p, d in zip(parts, dense_views):
            p.dense = d
    scales = None
    if first.scales is not None:
        scales, scale_views = _concat_rows([p.scales for p in parts])
        for p, sv in zip(parts, scale_views):
            p.scales = sv
    for p in parts:
        p._routes = {}  # a route captured the old packed tensors
    out_features = sum(p.out_features for p in parts)
    return SparseLinear(first.in_features, out_features, first.layout, (values, *structure), _fused_bias(parts),
                        _combined_table([p.dispatch for p in parts]), dense, scales)


def _combined_table(tables: list[DispatchTable]) -> DispatchTable:
    """A token count M gets the backend every table gives it, or "dense" where they disagree."""
    if all(t == tables[0] for t in tables):
        return tables[0]
    rows: list[tuple[int, str]] = []
    for bound in sorted({m for t in tables for m, _ in t.rows}):
        chosen = {t.backend_for(bound) for t in tables}
        backend = chosen.pop() if len(chosen) == 1 else "dense"
        if rows and rows[-1][1] == backend:
            rows[-1] = (bound, backend)
        else:
            rows.append((bound, backend))
    return DispatchTable(tuple(rows), source=f"combined from the {len(tables)} fused layers' tables")
