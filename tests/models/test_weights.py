"""sparsefast.models.weights: check_finite_weights names the first prunable linear whose weight holds NaN or inf (the
entry points that must call it before any work are tested with them: tests/test_api.py,
tests/prune/structural/test_init.py, tests/cli/test_prune.py, tests/cli/test_recover.py)."""

from __future__ import annotations

import pytest
import torch

from sparsefast.models import check_finite_weights
from tests.conftest import tiny_model


def test_first_bad_module_is_named_and_clean_models_pass():
    model = tiny_model("llama").float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj "):
        check_finite_weights(model)
    check_finite_weights(tiny_model("opt"))
    opt = tiny_model("opt")
    with torch.no_grad():
        opt.model.decoder.layers[0].fc1.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.0\.fc1 "):
        check_finite_weights(opt)
