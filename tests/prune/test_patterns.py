"""Pattern parsing, config validation, and exact patterns of every method on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

from sparsefast.api import prune
from sparsefast.config import MagnitudeConfig, SparseGPTConfig, WandaConfig, make_config, parse_pattern
from sparsefast.prune.base import max_nonzeros_per_group
from tests.conftest import TINY_FAMILIES, tiny_model


def test_parse_pattern():
    assert parse_pattern("unstructured").nm is None
    assert parse_pattern("2:4").nm == (2, 4) and str(parse_pattern(" 4 : 8 ")) == "4:8"
    for bad, msg in [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"), ("2-4", "unknown pattern"),
                     ("block", "unknown pattern"), ("2:4:8", "unknown pattern")]:
        with pytest.raises(ValueError, match=msg):
            parse_pattern(bad)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be"),
    (dict(sparsity=float("nan")), r"sparsity must be"),
    (dict(pattern="2:4", sparsity=0.6), "implies sparsity 0.5"),
    (dict(pattern="4:2"), "0 < N < M"),
    (dict(nsamples=0), "nsamples must be an integer >= 1"),
    (dict(seqlen=0), "seqlen must be"),
    (dict(device="tpu"), "device must be"),
    (dict(dtype="int8"), "unknown dtype"),
    (dict(backend="fast"), "backend must be one of"),
])
def test_config_rejects(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        make_config("wanda", **kwargs)


def test_method_specific_validation():
    with pytest.raises(ValueError, match="unknown method"):
        make_config("obs")
    with pytest.raises(ValueError, match="scope"):
        MagnitudeConfig(scope="global").validate()
    with pytest.raises(ValueError, match="multiple of M"):
        SparseGPTConfig(pattern="4:8", blocksize=12).validate()
    with pytest.raises(ValueError, match="percdamp"):
        SparseGPTConfig(percdamp=0).validate()
    assert WandaConfig(pattern="1:4").target_sparsity == 0.75 and WandaConfig().target_sparsity == 0.5


def test_m_must_divide_every_linear():
    model = tiny_model("llama")  # hidden 64, intermediate 128
    with pytest.raises(ValueError, match="M=48 must divide.*in_features=64"):
        prune(model, MagnitudeConfig(pattern="2:48"))
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing touched


def check_pattern(model, report, pattern, sparsity):
    from sparsefast.models import get_adapter

    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.decoder_layers(model)):
        for name, lin in adapter.prunable_linears(layer).items():
            w = lin.weight
            if pattern == "unstructured":
                assert ((w == 0).sum(1) == int(w.shape[1] * sparsity)).all(), name
            else:
                n, m = map(int, pattern.split(":"))
                assert max_nonzeros_per_group(w, m) <= n, name
            assert report["linears"][f"layers.{i}.{name}"]["zeros"] == int((w == 0).sum())
    emb = model.get_input_embeddings().weight
    assert (emb != 0).float().mean() > 0.99  # embeddings are never pruned


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_every_method_family_pattern(family, method, pattern):
    model = tiny_model(family)
    sparsity = 0.5 if pattern == "unstructured" else None
    extra = {"scope": "row"} if method == "magnitude" else {"blocksize": 32} if method == "sparsegpt" else {}
    cfg = make_config(method, pattern=pattern, sparsity=sparsity, nsamples=4, seqlen=16, batch_size=2, **extra)
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    report = prune(model, cfg, calib, progress=False)
    assert report["method"] == method and report["pattern"] == pattern
    if method == "sparsegpt" and pattern == "unstructured":
        for name, s in report["linears"].items():  # exact per 32-column block, not per row
            out, cols = s["shape"]
            assert s["zeros"] >= sum(int(out * min(32, cols - b) * 0.5) for b in range(0, cols, 32)), name
    else:
        check_pattern(model, report, pattern, 0.5)
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
