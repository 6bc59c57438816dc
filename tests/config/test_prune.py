"""sparsefast.config.prune: pattern parsing, and every model-independent setting refused when a config is made (frozen
dataclasses validated in __post_init__: an instance is always valid)."""

from __future__ import annotations

import dataclasses

import pytest

from sparsefast.config.prune import MagnitudeConfig, SparseGPTConfig, WandaConfig, make_config, parse_pattern


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
        MagnitudeConfig(scope="global")
    with pytest.raises(ValueError, match="multiple of M"):
        SparseGPTConfig(pattern="4:8", blocksize=12)
    with pytest.raises(ValueError, match="percdamp"):
        SparseGPTConfig(percdamp=0)
    assert WandaConfig(pattern="1:4").target_sparsity == 0.75 and WandaConfig().target_sparsity == 0.5


def test_a_config_is_parsed_once_and_stays_valid():
    cfg = WandaConfig(pattern=" 2 : 4 ")
    assert cfg.parsed_pattern is cfg.parsed_pattern and str(cfg.parsed_pattern) == "2:4"
    assert cfg.to_dict()["target_sparsity"] == 0.5 and "parsed_pattern" not in cfg.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sparsity = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="0 < N < M"):  # a changed copy is validated like a new one
        dataclasses.replace(cfg, pattern="4:2")
    assert dataclasses.replace(cfg, pattern="4:8").parsed_pattern.nm == (4, 8)
