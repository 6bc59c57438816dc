"""Bad input is a clear ValueError before any gradient, weight change or file write."""

from __future__ import annotations

import pytest
import torch

from sparsefast.prune.structural import StructuralConfig, prune_structured
from sparsefast.prune.structural.config import parse_layer_range
from tests.conftest import tiny_model


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        StructuralConfig(ratio=ratio).validate()


@pytest.mark.parametrize("field,value", [("importance", "taylor"), ("aggregation", "median"),
                                         ("strategy", "width"), ("gqa", "uneven"), ("ranking", "both")])
def test_unknown_choices(field, value):
    with pytest.raises(ValueError, match=field):
        StructuralConfig(**{field: value}).validate()


def test_layer_ranges():
    assert parse_layer_range("3-27", 30) == (3, 28)
    assert parse_layer_range(None, 30) == (1, 29)
    for bad in ("0-2", "2-1", "a-b", "3", "-1-1"):
        with pytest.raises(ValueError, match="layer"):
            parse_layer_range(bad, 2)


@pytest.mark.parametrize("cfg,match", [
    (StructuralConfig(ratio=0.2, layers="0-5", importance="element1"), "outside the model"),
    (StructuralConfig(ratio=0.8, layers="0-1", gqa="kv_groups", importance="element1"), "every KV group"),
    (StructuralConfig(ratio=0.8, layers="0-1", gqa="divisible", importance="element1"), "every head"),
    (StructuralConfig(ratio=0.8, layers="0-1", prune_attention=False, importance="element1"), None),
    (StructuralConfig(ratio=0.999, layers="0-1", prune_attention=False, importance="element1"), "every MLP"),
    (StructuralConfig(ratio=0.9, strategy="layer", layers="0-1", importance="element1"), "every decoder layer"),
])
def test_impossible_requests_fail_before_work(cfg, match):
    model = tiny_model("llama").float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 256, (1, 8))
    if match is None:  # the control case runs: removing 80% of MLP channels is allowed
        prune_structured(model, None, cfg, calib)
        return
    with pytest.raises(ValueError, match=match):
        prune_structured(model, None, cfg, calib)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
