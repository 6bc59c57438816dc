"""sparsefast.bench.prune_speed: settings refused before any work, the extrapolation label. A whole run on the
story llama is tests/cli/test_bench.py's (through `sparsefast bench prune`)."""

from __future__ import annotations

import pytest

from sparsefast.bench.prune_speed import _extrapolate, run_prune_bench


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": "wanda,magic"}, r"unknown method\(s\) \['wanda', 'magic'\]"),
    ({"methods": ","}, r"unknown method\(s\) \[\]"),
    ({"nsamples": 0}, "--nsamples must be >= 1, got 0"),
    ({"seqlen": -1}, "--seqlen must be >= 1, got -1"),
    ({"model": "llama-tiny-random", "layers": 0}, "--layers must be >= 1, got 0"),
])
def test_bad_settings_fail_before_a_model_is_built(kwargs, message, capsys):
    with pytest.raises(ValueError, match=message):
        run_prune_bench(**{"model": "no-such-model", "device": "cpu", **kwargs})
    assert capsys.readouterr().out == ""  # no method ran


def test_extrapolation_is_labelled_and_adds_the_capture_once():
    res = {"capture_s": 1.0, "per_layer": [{"calib_forward_s": 2.0, "metric_mask_s": 0.5},
                                           {"calib_forward_s": 4.0, "metric_mask_s": 1.5}]}
    ext = _extrapolate(res, 2, 32)
    assert ext["label"] == "EXTRAPOLATED from 2 measured layers to 32"
    assert ext["calib_forward_s"] == 1.0 + 3.0 * 32 and ext["metric_mask_s"] == 1.0 * 32
    assert ext["total_s"] == ext["calib_forward_s"] + ext["metric_mask_s"]
