"""DSnoT: the vectorised refinement against a per-row loop written from the paper's equations, its invariants, and
the engine path (any method + refine="dsnot")."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sparsefast.api import prune
from sparsefast.config import MagnitudeConfig, RIAConfig, SparseGPTConfig, WandaConfig
from sparsefast.prune import dsnot_refine, score_mask
from sparsefast.prune.base import max_nonzeros_per_group
from tests.conftest import tiny_model


def loop_dsnot(weight, pruned, mean, var, sq, *, nm=None, cycles=50, threshold=0.1, gamma=1.0):
    """Row by row in Python floats: ε = Σ_pruned W·E[x]; grow the initially pruned weight of ε's sign with the
    largest |W·E[x]| / Var^γ, prune the initially kept weight of the opposite sign (unstructured) or in the grown
    weight's M-group (N:M) with the smallest |W|·‖x‖; N:M swaps must keep ε's sign; stop at |ε| <= threshold."""
    rows, cols = weight.shape
    out = pruned.clone()
    for i in range(rows):
        w = [float(v) for v in weight[i]]
        c = [w[j] * float(mean[j]) for j in range(cols)]
        imp = [abs(w[j]) * math.sqrt(float(sq[j])) for j in range(cols)]
        key = [abs(c[j]) / float(var[j]) ** gamma if c[j] != 0 else 0.0 for j in range(cols)]
        init = [bool(v) for v in pruned[i]]
        cur = list(init)
        eps = sum(c[j] for j in range(cols) if init[j])
        for _ in range(cycles):
            if abs(eps) <= threshold:
                break
            s = 1.0 if eps > 0 else -1.0
            grow = [j for j in range(cols) if init[j] and cur[j] and c[j] * s > 0]
            if not grow:
                break
            g = max(grow, key=lambda j: (key[j], -j))
            if nm is None:
                cand = [j for j in range(cols) if not init[j] and not cur[j] and c[j] * s < 0]
            else:
                cand = [j for j in range(cols) if not init[j] and not cur[j] and j // nm[1] == g // nm[1]]
            if not cand:
                break
            p = min(cand, key=lambda j: (imp[j], j))
            after = eps - c[g] + c[p]
            if nm is not None and (after > 0) != (eps > 0):
                break
            cur[g], cur[p] = False, True
            eps = after
        out[i] = torch.tensor(cur)
    return out


def stats(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, cols, generator=g) * torch.rand(cols, generator=g) * 3 + torch.randn(cols, generator=g)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return x, mean, var, (x * x).sum(0)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_loop_reading_of_the_paper(nm, seed):
    g = torch.Generator().manual_seed(100 + seed)
    w = torch.randn(24, 32, generator=g)
    x, mean, var, sq = stats(32, seed)
    wanda = w.abs() * sq.sqrt()[None, :]
    pruned = score_mask(wanda, sparsity=0.5) if nm is None else score_mask(wanda, n=nm[0], m=nm[1])
    got = dsnot_refine(w, pruned, mean, var, sq, nm=nm, threshold=0.05)
    want = loop_dsnot(w, pruned, mean, var, sq, nm=nm, threshold=0.05)
    assert torch.equal(got, want)
    assert not torch.equal(got, pruned)  # the check can fail: swaps happened
    assert torch.equal(got.sum(1), pruned.sum(1))  # every row keeps its number of pruned weights
    if nm is not None:
        assert max_nonzeros_per_group((~got).float(), nm[1]) == nm[0]


def test_reduces_the_expected_reconstruction_error_and_cycles_bound_the_swaps():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 48, generator=g)
    x, mean, var, sq = stats(48, 3)
    pruned = score_mask(w.abs() * sq.sqrt()[None, :], sparsity=0.6)

    def err(mask):
        return ((w * mean[None, :]) * mask).sum(1).abs().mean()

    refined = dsnot_refine(w, pruned, mean, var, sq, threshold=0.0)
    assert err(refined) < 0.7 * err(pruned)
    one = dsnot_refine(w, pruned, mean, var, sq, cycles=1, threshold=0.0)
    assert int((one & ~pruned).sum(1).max()) == 1
    assert torch.equal(dsnot_refine(w, pruned, mean, var, sq, threshold=1e9), pruned)


def calib_ids(n=6, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [
    WandaConfig(nsamples=6, seqlen=24, batch_size=2, refine="dsnot", dsnot_threshold=0.0),
    WandaConfig(nsamples=6, seqlen=24, batch_size=2, pattern="2:4", refine="dsnot", dsnot_threshold=0.0),
    MagnitudeConfig(nsamples=6, seqlen=24, batch_size=2, refine="dsnot", dsnot_threshold=0.0, dsnot_scope="all"),
    RIAConfig(nsamples=6, seqlen=24, batch_size=2, pattern="2:4", refine="dsnot", dsnot_threshold=0.0,
              dsnot_scope="all"),
    SparseGPTConfig(nsamples=6, seqlen=24, batch_size=2, pattern="2:4", refine="dsnot", dsnot_threshold=0.0),
], ids=["wanda", "wanda-2:4", "magnitude-all", "ria-2:4-all", "sparsegpt-2:4"])
def test_engine_refines_every_method(config):
    calib = calib_ids()
    plain = tiny_model("llama", num_hidden_layers=2)
    refined = tiny_model("llama", num_hidden_layers=2)
    base = dataclasses.replace(config, refine=None)
    prune(plain, base, calib, progress=False)
    report = prune(refined, config, calib, progress=False)
    swaps = [s["dsnot_swaps"] for s in report["linears"].values()]
    assert sum(swaps) > 0
    changed = set()
    for (name, a), (_, b) in zip(plain.named_parameters(), refined.named_parameters()):
        if a.dim() == 2 and "embed" not in name and "lm_head" not in name:
            assert torch.equal((a == 0).sum(1), (b == 0).sum(1)) or config.method == "sparsegpt", name
            if not torch.equal(a == 0, b == 0):
                changed.add(".".join(name.split(".")[2:4]))  # e.g. "0.mlp"
            if config.parsed_pattern.nm:
                assert max_nonzeros_per_group(b, 4) <= 2, name
    assert "0.self_attn" in changed
    # the paper's code refines attention only (layer 0's MLP sees the same inputs either way; later layers do not)
    assert ("0.mlp" in changed) == (config.dsnot_scope == "all")


def test_refiner_statistics_follow_a_channel_permutation():
    from sparsefast.prune import DSnoTRefiner

    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(3, 10, 16, generator=g) + 0.5
    pruned = score_mask(lin.weight.detach().abs(), n=2, m=4)
    order = torch.randperm(16, generator=g)

    def refined(weight, xs, mask, permute=None):
        r = DSnoTRefiner(WandaConfig(refine="dsnot", dsnot_threshold=0.0))
        r.targets = ("fc",)
        r.start_layer({"fc": lin})
        r.add_batch("fc", xs)
        if permute is not None:
            r.permute("fc", permute)
        return r.refine("fc", weight, mask, nm=None)

    w = lin.weight.detach()
    want = refined(w[:, order], x[..., order], pruned[:, order])
    assert torch.equal(refined(w[:, order], x, pruned[:, order], permute=order), want)
    assert not torch.equal(refined(w[:, order], x, pruned[:, order]), want)  # the check can fail
    # a linear outside the refiner's scope (RIA reallocates the down projections; DSnoT's default scope is the
    # attention) has no statistics to follow: nothing to do, no error
    r = DSnoTRefiner(WandaConfig(refine="dsnot"))
    r.targets = ("fc",)
    r.start_layer({"fc": lin, "down": torch.nn.Linear(16, 8)})
    r.permute("down", order)
    assert set(r.sums) == {"fc"}


def test_magnitude_with_dsnot_needs_calibration_data():
    assert not MagnitudeConfig().needs_calibration
    assert MagnitudeConfig(refine="dsnot").needs_calibration
    with pytest.raises(ValueError, match="needs calibration"):
        prune(tiny_model("llama"), MagnitudeConfig(refine="dsnot"), None, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"refine": "grow"}, "refine must be one of dsnot"),
    ({"refine": "dsnot", "dsnot_cycles": 0}, "dsnot_cycles"),
    ({"refine": "dsnot", "dsnot_threshold": -1.0}, "dsnot_threshold"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WandaConfig(**kwargs)
