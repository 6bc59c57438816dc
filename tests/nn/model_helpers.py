"""Shared by the tests of sparsefast.nn: pruned linears and models, and greedy decoding."""

from __future__ import annotations

import torch
from torch import nn

from sparsefast.ops.sparse24 import to_sparse24_by_magnitude


def pruned_linear(out_f: int, in_f: int, sparsity: float | None, seed: int, bias: bool = True) -> nn.Linear:
    """A random nn.Linear, 2:4 by magnitude (sparsity None), else with about that fraction of zeros at random."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        if sparsity is None:
            lin.weight.copy_(to_sparse24_by_magnitude(lin.weight))
        else:
            lin.weight[torch.rand(lin.weight.shape) < sparsity] = 0
    return lin


def prune_linears(model: nn.Module, sparsity: float | None) -> None:
    """Zero weights of every nn.Linear but the head: 2:4 by magnitude (sparsity None), else the `sparsity` fraction
    of smallest magnitudes of each layer (unstructured)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and "lm_head" not in name:
                if sparsity is None:
                    mod.weight.copy_(to_sparse24_by_magnitude(mod.weight))
                else:
                    cut = mod.weight.abs().flatten().kthvalue(int(sparsity * mod.weight.numel())).values
                    mod.weight[mod.weight.abs() <= cut] = 0


def greedy_generate(model: nn.Module, ids: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """ids [batch, prompt] → [batch, prompt + <= steps]: transformers' greedy generate (KV cache, M = 1 per step)."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0)
