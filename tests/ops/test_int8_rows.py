"""sparsefast.ops.int8_rows: the per-row symmetric int8 format the CPU kernels run, against its definition."""

from __future__ import annotations

import pytest
import torch

from sparsefast.ops.int8_rows import INT8_MAX, dequantize_int8_rows, int8_row_scales, quantize_int8_rows


def test_quantize_is_the_absmax_grid_per_row():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 33, generator=gen)
    w[2] = 0  # a row of zeros
    w[3, 5] = 0  # a zero inside a row stays a zero
    q, scales = quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (7,)
    for r in range(7):
        amax = float(w[r].abs().max())
        expected_scale = amax / 127 if amax else 1.0
        assert scales[r].item() == pytest.approx(expected_scale, rel=1e-7)
        for c in range(33):
            assert int(q[r, c]) == round(float(w[r, c]) / scales[r].item())  # Python's round: half to even
    assert int(q[3, 5]) == 0 and not q[2].any()
    assert int(q.abs().max()) == INT8_MAX and int(q.min()) >= -INT8_MAX  # the extreme of each row maps to ±127
    err = (dequantize_int8_rows(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())  # round to nearest: at most half a step


def test_given_scales_clamp_and_exact_round_trip():
    w = torch.tensor([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0]])
    q, scales = quantize_int8_rows(w, torch.tensor([0.01, 2.0]))
    assert q.tolist() == [[100, -127, 50], [0, 0, 0]]  # -300 clamps to -127
    assert torch.equal(quantize_int8_rows(dequantize_int8_rows(q, scales), scales)[0], q)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        int8_row_scales(torch.zeros(3))
    with pytest.raises(ValueError, match=r"scales must be \[2\]"):
        quantize_int8_rows(torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="q int8"):
        dequantize_int8_rows(torch.zeros(2, 4), torch.ones(2))
