"""sparsefast.models.opt: OPT's biased linears and its optional final norm (OPT-350m)."""

from __future__ import annotations

from sparsefast.models import get_adapter
from tests.conftest import tiny_model


def test_opt_has_biases_and_optional_final_norm():
    model = tiny_model("opt")
    adapter = get_adapter(model)
    for lin in adapter.prunable_linears(adapter.decoder_layers(model)[0]).values():
        assert lin.bias is not None
    model.model.decoder.final_layer_norm = None  # OPT-350m style (do_layer_norm_before=False)
    assert adapter.final_norm(model) is None
    assert adapter.post_layer_modules(model) == [model.lm_head]
