"""Wanda: hand-computed 2x8 cases (|W|·‖X‖ per row), the statistic, exact per-row / per-group counts."""

from __future__ import annotations

import pytest
import torch

from sparsefast.config import WandaConfig
from sparsefast.prune.base import max_nonzeros_per_group
from sparsefast.prune.wanda import WandaPruner

W = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 0.5, -8.0, 1.0],
                  [2.0, 2.0, -2.0, 2.0, 1.0, -1.0, 1.0, 1.0]])
# input tokens: column norms ‖X_j‖ = [4, 1, 1, 0.5, 2, 2, 0.1, 3] (one token per value below, two tokens)
X = torch.tensor([[4.0, 1.0, 0.0, 0.3, 2.0, 0.0, 0.1, 3.0],
                  [0.0, 0.0, 1.0, 0.4, 0.0, 2.0, 0.0, 0.0]])


def prune_linear(pattern="unstructured", sparsity=None):
    lin = torch.nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    pruner = WandaPruner(WandaConfig(pattern=pattern, sparsity=sparsity))
    pruner.start_layer({"fc": lin})
    pruner.add_batch("fc", X[None, :1])  # two batches of one token: the statistic is a sum over batches
    pruner.add_batch("fc", X[None, 1:])
    assert torch.allclose(pruner.acc["fc"], torch.tensor([16.0, 1, 1, 0.25, 4, 4, 0.01, 9]))
    stats = pruner.prune("fc", lin)
    return lin.weight.detach(), stats


def test_unstructured_hand_case():
    # scores |W|·‖X‖: row0 [4, 2, 3, 2, 1, 1, 0.8, 3]  row1 [8, 2, 2, 1, 2, 2, 0.1, 3]
    w, stats = prune_linear(sparsity=0.5)
    # row0 4 lowest: 0.8(6), 1(4), 1(5), then the tie 2 at cols 1 and 3 → col 1 (lower index)
    assert (w[0] == 0).nonzero().flatten().tolist() == [1, 4, 5, 6]
    # row1: 0.1(6), 1(3), then ties 2 at cols 1,2,4,5 → cols 1, 2
    assert (w[1] == 0).nonzero().flatten().tolist() == [1, 2, 3, 6]
    assert stats["zeros"] == 8 and stats["tokens"] == 2
    kept = w != 0
    assert torch.equal(w[kept], W[kept])  # Wanda never updates weights


def test_differs_from_magnitude():
    w, _ = prune_linear(sparsity=0.25)
    # magnitude would prune the 0.5s of row 0; Wanda prunes col 6 (|w|=8 but ‖x‖=0.1) and col 4
    assert (w[0] == 0).nonzero().flatten().tolist() == [4, 6]


def test_nm_hand_case():
    w, _ = prune_linear(pattern="2:4")
    # row0 groups: [4,2,3,2] → cols 1, 3 ; [1,1,0.8,3] → cols 6, 4 ; row1: [8,2,2,1] → 3, 1 ; [2,2,.1,3] → 6, 4
    assert (w == 0).nonzero().tolist() == [[0, 1], [0, 3], [0, 4], [0, 6], [1, 1], [1, 3], [1, 4], [1, 6]]


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.37), ("2:4", None),
                                              ("4:8", None), ("3:8", None)])
def test_exact_counts_random(pattern, sparsity):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 11)
    pruner = WandaPruner(WandaConfig(pattern=pattern, sparsity=sparsity))
    pruner.start_layer({"fc": lin})
    pruner.add_batch("fc", torch.randn(3, 5, 40))
    pruner.prune("fc", lin)
    zeros_per_row = (lin.weight == 0).sum(1)
    if pattern == "unstructured":
        assert (zeros_per_row == int(40 * sparsity)).all()
    else:
        n, m = map(int, pattern.split(":"))
        assert max_nonzeros_per_group(lin.weight, m) <= n and (zeros_per_row == 40 * (m - n) // m).all()


def test_unused_linear_is_an_error():
    lin = torch.nn.Linear(8, 2)
    pruner = WandaPruner(WandaConfig())
    pruner.start_layer({"fc": lin})
    with pytest.raises(RuntimeError, match="no calibration activations"):
        pruner.prune("fc", lin)
