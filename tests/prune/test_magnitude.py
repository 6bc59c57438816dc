"""Magnitude pruning: hand-computed 2x8 cases, exact counts, the (value, index) tie rule."""

from __future__ import annotations

import pytest
import torch

from sparsefast.config import MagnitudeConfig
from sparsefast.prune.base import max_nonzeros_per_group
from sparsefast.prune.magnitude import MagnitudePruner, magnitude_layer_mask, magnitude_mask

W = torch.tensor([[0.5, -3.0, 1.0, -0.1, 2.0, -2.0, 0.3, 4.0],
                  [-6.0, 0.2, 0.2, 5.0, -0.05, 1.5, -1.0, 0.7]])


def as_sets(mask):
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_row_scope_hand_case():
    # row 0 |w| ascending: 0.1(3) 0.3(6) 0.5(0) 1.0(2) ...; row 1: 0.05(4) 0.2(1) 0.2(2) 0.7(7) ...
    mask = magnitude_mask(W, sparsity=0.5, scope="row")
    assert as_sets(mask) == [{3, 6, 0, 2}, {4, 1, 2, 7}]
    # 3/8 → int(3.0)=3 per row; the tie 0.2 at columns 1, 2: both go (3 lowest: 0.05, 0.2, 0.2)
    assert as_sets(magnitude_mask(W, sparsity=0.375, scope="row")) == [{3, 6, 0}, {4, 1, 2}]
    # 0.25 → 2 per row; tie 0.2 at columns 1 and 2 → lower column (1) pruned first
    assert as_sets(magnitude_mask(W, sparsity=0.25, scope="row")) == [{3, 6}, {4, 1}]


def test_layer_scope_hand_case():
    # all 16 |w| ascending: .05(1,4) .1(0,3) .2(1,1) .2(1,2) .3(0,6) .5(0,0) .7(1,7) 1(0,2) 1(1,6) 1.5(1,5)
    # 2(0,4) 2(0,5) 3 4 5 6
    mask = magnitude_layer_mask(W, 0.45)  # int(7.2) = 7: everything below 1
    assert as_sets(mask) == [{3, 6, 0}, {4, 1, 2, 7}]
    mask = magnitude_layer_mask(W, 0.5)  # 8: the tie |w|=1 at (0,2) and (1,6) → flat index 2 < 14 goes first
    assert as_sets(mask) == [{3, 6, 0, 2}, {4, 1, 2, 7}]
    mask = magnitude_layer_mask(W, 0.7)  # int(11.2) = 11: + (1,6), 1.5 at (1,5), and of the tie 2 only (0,4)
    assert as_sets(mask) == [{3, 6, 0, 2, 4}, {4, 1, 2, 7, 6, 5}]


def test_nm_hand_case():
    mask = magnitude_mask(W, n=2, m=4)
    # row0 groups [.5,3,1,.1] → prune cols 3,0 ; [2,2,.3,4] → 6 and the tie 2,2 → col 4 (lower index)
    assert as_sets(mask) == [{3, 0, 6, 4}, {1, 2, 4, 7}]
    mask = magnitude_mask(W, n=1, m=8)
    assert mask.sum(1).tolist() == [7, 7] and not mask[0, 7] and not mask[1, 0]


@pytest.mark.parametrize("scope", ["layer", "row"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_exact_counts_random(scope, sparsity):
    torch.manual_seed(0)
    w = torch.randn(13, 37)
    w[0, :5] = 0.25  # ties
    mask = magnitude_mask(w, sparsity=sparsity, scope=scope)
    if scope == "layer":
        assert int(mask.sum()) == int(w.numel() * sparsity)
        if mask.any() and not mask.all():
            assert w.abs()[mask].max() <= w.abs()[~mask].min()
    else:
        assert (mask.sum(1) == int(37 * sparsity)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "1:4"])
def test_pruner_on_linear(pattern, dtype):
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 24).to(dtype)
    before = lin.weight.detach().clone()
    cfg = MagnitudeConfig(pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None)
    stats = MagnitudePruner(cfg).prune("fc", lin)
    kept = lin.weight != 0
    assert torch.equal(lin.weight[kept], before[kept])  # no weight update
    if pattern == "unstructured":
        assert stats["zeros"] == int(64 * 24 * 0.6)
    else:
        n, m = map(int, pattern.split(":"))
        assert max_nonzeros_per_group(lin.weight, m) <= n and stats["zeros"] == 64 * 24 * (m - n) // m
