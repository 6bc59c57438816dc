"""The one place where sparse linears enter a served model: `prepare_model`, run once before the engine is built.

The engine runs the model's own modules, so whatever this swaps in is what decodes. Modes:
* ``auto``: on CUDA, every 2:4-sparse nn.Linear becomes a `Sparse24Linear` (packed values + metadata; its dispatch
  table picks the kernel per token count); on CPU nothing changes here (a CPU sparse linear is swapped in by the
  loader when it has one).
* ``sparse24``: the same swap on any device (on CPU `Sparse24Linear` runs its dense torch fallback: the path is
  exercised, nothing is faster).
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
    dev = torch.device(device)
    if sparse == "off" or (sparse == "auto" and dev.type != "cuda"):
        return []
    from sparsefast.nn import swap_linear_with_sparse24

    return swap_linear_with_sparse24(model)
