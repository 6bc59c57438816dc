"""Checks on weights before any work: the safetensors files of a checkpoint are readable (not truncated, not
header-only) and the prunable weights of a loaded model hold no NaN/inf."""

from __future__ import annotations

import os
from collections.abc import Iterable

from torch import nn

from sparsefast.models.base import get_adapter
from sparsefast.ops.wanda_mask import all_finite


def check_weight_files(files: Iterable[str | os.PathLike]) -> None:
    """Open every safetensors file's header and check that its tensors cover the file exactly (safetensors'
    own validation; no tensor is read). Raises ValueError naming the first bad file and the fix."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean an unusable file
            raise ValueError(f"{f}: not a complete safetensors file ({exc}); it is truncated or corrupt: "
                             "download or save it again") from exc


def check_finite_weights(model: nn.Module) -> None:
    """Raise ValueError naming the first prunable linear (decoder layers, the adapter's prunable linears) whose
    weight holds NaN or inf. One aminmax reduction per weight (no full-size temporaries), before any work: a NaN
    would otherwise spread through SparseGPT's update or survive magnitude pruning into a "saved" checkpoint."""
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, linear in adapter.prunable_linears(layer).items():
            if not all_finite(linear.weight.detach()):
                raise nonfinite_weight(f"{adapter.layers_path}.{i}.{name}")


def nonfinite_weight(name: str) -> ValueError:
    """The error for a prunable weight holding NaN or inf (loaded, or read from disk by pruning from disk)."""
    return ValueError(f"the weight of {name} holds NaN or inf: the checkpoint is corrupt or overflowed in its dtype "
                      "(try --dtype float32); fix or re-download it")
