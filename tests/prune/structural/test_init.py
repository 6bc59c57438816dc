"""prune_structured (sparsefast.prune.structural): every request this model cannot satisfy, non-finite weights and
a seqlen beyond the context are clear ValueErrors before any gradient, weight change or file write; separate
attention / MLP ranges in the report."""

from __future__ import annotations

import pytest
import torch

from sparsefast.prune.structural import StructuralConfig, prune_structured
from tests.conftest import tiny_model


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


def test_default_range_on_two_layers_says_what_to_pass():
    with pytest.raises(ValueError, match=r"--layers 0-1"):
        prune_structured(tiny_model("llama").float(), None, StructuralConfig(importance="l2"))


def test_attention_and_mlp_ranges_are_pruned_separately():
    model = tiny_model("llama", num_hidden_layers=4).float()
    report = prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", attn_layers="1-2",
                                                            mlp_layers="0-3"))
    per_layer = report["removed"]["per_layer"]
    assert [per_layer[str(i)]["query_heads"] for i in range(4)] == [0, 2, 2, 0]
    assert [per_layer[str(i)]["mlp_channels"] for i in range(4)] == [64] * 4
    assert report["layer_ranges"] == {"attention": [1, 3], "mlp": [0, 4]} and report["layer_range"] == [0, 4]
    assert [info["num_attention_heads"] for info in report["layers"]] == [4, 2, 2, 4]
    # a kind left unpruned needs no range: the 2-layer default (which leaves no layer) is never consulted
    report = prune_structured(tiny_model("llama").float(), None, StructuralConfig(
        ratio=0.5, importance="l2", prune_attention=False, mlp_layers="0-1"))
    assert report["layer_ranges"] == {"attention": None, "mlp": [0, 2]}


def test_seqlen_above_context_fails_before_calibration():
    model = tiny_model("llama").float()     # max_position_embeddings 256
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        prune_structured(model, None, StructuralConfig(seqlen=300, layers="0-1"))   # tokenizer None: never reached
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    prune_structured(model, None, StructuralConfig(seqlen=300, layers="0-1", importance="l2"))   # no calibration


def test_non_finite_weights_are_refused_before_work():
    model = tiny_model("llama").float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"down_proj holds NaN or inf"):
        prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), None)
    assert all(torch.equal(p.isnan(), before[n].isnan()) and torch.equal(p.nan_to_num(), before[n].nan_to_num())
               for n, p in model.named_parameters())
    assert model.model.layers[1].mlp.down_proj.weight.shape == (64, 128)
