"""OWL: the outlier ratio and the allocation against the paper's equations, the ratios from the dense model's
activations, and the engine pruning each layer at its own sparsity."""

from __future__ import annotations

import pytest
import torch

from sparsefast.api import prune
from sparsefast.calibrate import layer_outlier_ratios
from sparsefast.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from sparsefast.models import get_adapter
from sparsefast.prune import outlier_ratio, owl_layer_sparsities
from tests.conftest import tiny_model
from tests.test_calibrate import collect


def test_outlier_ratio_by_hand():
    # mean of all 8 entries = 2.5; M = 2 -> entries above 5 are outliers: 6 and 9 -> 2 / 8
    a = torch.tensor([[1.0, 1.0, 6.0], [0.0, 1.0, 1.0]])
    b = torch.tensor([1.0, 9.0])
    assert outlier_ratio([a, b], 2.0) == 2 / 8
    assert outlier_ratio([a, b], 4.0) == 0.0  # threshold 10


def test_allocation_follows_the_equations():
    ratios = [0.01, 0.05, 0.02, 0.03, 0.01]
    target, lam = 0.7, 0.08
    got = owl_layer_sparsities(ratios, target, lam)
    lo, hi = min(ratios), max(ratios)
    scaled = [(r - lo) / (hi - lo) * 2 * lam for r in ratios]
    want = [1 - (s - sum(scaled) / len(scaled) + 1 - target) for s in scaled]
    assert got == pytest.approx(want, abs=1e-15)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-12)  # the mean sparsity is the target
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert got[1] == min(got) and got[0] == got[4] == max(got)  # more outliers, fewer pruned
    assert owl_layer_sparsities([0.2, 0.2, 0.2], 0.5, 0.1) == [0.5, 0.5, 0.5]


def dense_ratios(model, calib, m):
    """Outlier ratios from full-model forwards of the dense model (hooks on every prunable linear)."""
    adapter = get_adapter(model)
    layers = [adapter.prunable_linears(layer) for layer in adapter.decoder_layers(model)]
    acc = collect(model, layers, calib)
    out = []
    for k, d in enumerate(layers):
        scores = torch.cat([(lin.weight.abs() * acc[k][n].sqrt()[None, :]).flatten() for n, lin in d.items()])
        out.append(float((scores > m * scores.mean()).float().mean()))
    return out


def calib_ids(n=4, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_outlier_ratios_come_from_the_dense_model():
    model = tiny_model("llama", num_hidden_layers=4)
    calib = calib_ids()
    got = layer_outlier_ratios(model, get_adapter(model), calib, m=3.0, device=torch.device("cpu"), batch_size=2,
                               progress=False)
    want = dense_ratios(model, calib, 3.0)
    assert got == pytest.approx(want, abs=1e-6)
    assert len(set(got)) > 1  # the check can fail: the layers differ


@pytest.mark.parametrize("config_type", [WandaConfig, SparseGPTConfig, MagnitudeConfig])
def test_engine_prunes_each_layer_at_its_sparsity(config_type):
    model = tiny_model("llama", num_hidden_layers=4)
    calib = calib_ids()
    kwargs = {"scope": "row"} if config_type is MagnitudeConfig else {}
    config = config_type(nsamples=4, seqlen=24, batch_size=2, sparsity=0.6, allocation="owl", owl_m=3.0,
                         owl_lambda=0.1, **kwargs)
    report = prune(model, config, calib, progress=False)
    alloc = report["allocation"]
    assert alloc["method"] == "owl" and len(alloc["layer_sparsity"]) == 4
    assert sum(alloc["layer_sparsity"]) / 4 == pytest.approx(0.6, abs=1e-12)
    assert "owl_outlier_pass_s" in report["timings"]
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        s = alloc["layer_sparsity"][i]
        assert report["timings"]["per_layer"][i]["sparsity"] == s
        for name, lin in adapter.prunable_linears(layer).items():
            achieved = float((lin.weight == 0).float().mean())
            if config_type is SparseGPTConfig:  # exact per block, not per row
                assert achieved == pytest.approx(s, abs=0.03), name
            else:  # int(in * s) per row
                assert achieved == int(lin.in_features * s) / lin.in_features, name


@pytest.mark.parametrize("kwargs, match", [
    ({"pattern": "2:4", "allocation": "owl"}, "fixes it at 1 - N/M"),
    ({"allocation": "outlier"}, "allocation must be one of"),
    ({"allocation": "owl", "sparsity": 0.9, "owl_lambda": 0.08}, "owl_lambda"),
    ({"allocation": "owl", "owl_m": 0.0}, "owl_m"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WandaConfig(**kwargs)
