"""Gather the kept rows / columns of many matrices at once: the physical slice of structural pruning.

After LLM-Pruner-style pruning (Ma et al. 2023) every coupled weight of a decoder layer keeps a subset of its rows
(producers: q/k/v, gate/up) or columns (consumers: o_proj, down_proj); biases and norm weights are 1-D.
`structured_gather(mats, dims, indices)` returns `[m.index_select(d, i) for m, d, i in ...]`; on CUDA the compiled
kernel (csrc/slice/structured_gather.cu) does all of them in one launch instead of one launch per matrix.

mats: 1-D or 2-D tensors of any dtype (contiguous for the CUDA path), on one device.
dims: 0 (rows) or 1 (columns; 1-D tensors use 0 = their only axis). indices: 1-D int64 on the same device, each in
range. Returns new contiguous tensors; inputs are untouched.
"""

from __future__ import annotations

import torch

from sparsefast.ops._dispatch import select_backend

_OP = "structured_gather"


def check_structured_gather_args(mats: list[torch.Tensor], dims: list[int], indices: list[torch.Tensor]) -> None:
    if not (len(mats) == len(dims) == len(indices)):
        raise ValueError(f"{_OP}: mats, dims and indices must have one entry each; got {len(mats)}, {len(dims)}, "
                         f"{len(indices)}")
    for i, (m, d, idx) in enumerate(zip(mats, dims, indices)):
        if m.dim() not in (1, 2):
            raise ValueError(f"{_OP}: matrix {i} must be 1-D or 2-D, got shape {tuple(m.shape)}")
        if not -m.dim() <= d < m.dim():
            raise ValueError(f"{_OP}: dim {d} out of range for matrix {i} of shape {tuple(m.shape)}")
        if idx.dtype != torch.long or idx.dim() != 1:
            raise ValueError(f"{_OP}: index {i} must be 1-D int64, got {idx.dtype} {tuple(idx.shape)}")
        if idx.device != m.device or m.device != mats[0].device:
            raise ValueError(f"{_OP}: matrix {i} and its index must be on {mats[0].device}; got {m.device}, "
                             f"{idx.device}")
    bad = [i for i, (m, d, idx) in enumerate(zip(mats, dims, indices))
           if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m.shape[d])]
    if bad:
        i = bad[0]
        raise ValueError(f"{_OP}: index {i} holds values outside [0, {mats[i].shape[dims[i]]}) ")


def structured_gather_ref(mats: list[torch.Tensor], dims: list[int],
                          indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Torch twin: one index_select per matrix."""
    check_structured_gather_args(mats, dims, indices)
    return [m.index_select(d, i).contiguous() for m, d, i in zip(mats, dims, indices)]


@torch.library.custom_op("sparsefast::structured_gather", mutates_args=())
def _structured_gather_cuda(mats: list[torch.Tensor], dims: list[int],
                            indices: list[torch.Tensor]) -> list[torch.Tensor]:
    from sparsefast._ext import load_extension

    return list(load_extension().structured_gather(list(mats), list(dims), list(indices)))


@_structured_gather_cuda.register_fake
def _(mats, dims, indices):
    outs = []
    for m, d, i in zip(mats, dims, indices):
        shape = list(m.shape)
        shape[d % m.dim()] = i.shape[0]
        outs.append(m.new_empty(shape))
    return outs


def structured_gather(mats: list[torch.Tensor], dims: list[int], indices: list[torch.Tensor], *,
                      backend: str | None = "auto") -> list[torch.Tensor]:
    """Kept rows (dim 0) / columns (dim 1) of every matrix, in one CUDA launch when the extension is built."""
    if not mats:
        return []
    check_structured_gather_args(mats, dims, indices)
    cuda_ok = all(m.is_contiguous() and i.is_contiguous() and m.element_size() in (1, 2, 4, 8)
                  for m, i in zip(mats, indices))
    chosen = select_backend(_OP, mats[0], backend, has=("cuda", "torch"), cuda_ok=cuda_ok)
    if chosen == "cuda":
        return _structured_gather_cuda(list(mats), [d % m.dim() for m, d in zip(mats, dims)], list(indices))
    return [m.index_select(d, i).contiguous() for m, d, i in zip(mats, dims, indices)]
