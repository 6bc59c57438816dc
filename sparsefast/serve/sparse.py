"""The one place where sparse linears enter a served model: `prepare_model`, run once before the engine is built.

The engine runs the model's own modules, so whatever this swaps in is what decodes. Modes:
* ``auto``: on CUDA, every 2:4-sparse nn.Linear becomes a `Sparse24Linear` (packed values + metadata; its dispatch
  table picks the kernel per token count). On CPU, `swap_linear_with_sparse` times dense / 2:4 / unstructured for
  each linear with at least 30% zeros on this machine and keeps the fastest (`SparseLinear`), so a dense model and
  any layer where the kernel does not win stay `nn.Linear`.
* ``sparse24``: every 2:4 linear becomes a `Sparse24Linear` on any device, without timing.
* ``off``: leave the model as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

SPARSE_MODES = ("auto", "sparse24", "off")


def prepare_model(model: nn.Module, sparse: str = "auto", device: str | torch.device = "cpu") -> list[str]:
    """Swap sparse linears into `model` in place per `sparse`; returns the names of the swapped modules."""
    if sparse not in SPARSE_MODES:
        raise ValueError(f"sparse must be one of {', '.join(SPARSE_MODES)}; got {sparse!r}")
    if sparse == "off":
        return []
    from sparsefast.nn import swap_linear_with_sparse, swap_linear_with_sparse24

    if sparse == "sparse24" or torch.device(device).type == "cuda":
        return swap_linear_with_sparse24(model)
    records = swap_linear_with_sparse(model)
    return [name for name, rec in records.items() if rec["chosen"] != "dense"]
