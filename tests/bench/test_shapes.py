"""sparsefast.bench.shapes: the one table of benchmark shapes and its selection."""

from __future__ import annotations

import pytest

from sparsefast.bench.shapes import CPU_MODELS, MODELS, PER_LAYER, all_shapes, select_shapes, shape_id


def test_select_shapes_keeps_the_table_order_and_refuses_unknown_names():
    assert select_shapes(None) == select_shapes("") == all_shapes()
    assert len(all_shapes()) == sum(len(d) for d in MODELS.values())
    assert [s[0] for s in select_shapes("llama-70b,llama-7b")] == ["llama-7b"] * 3 + ["llama-70b"] * 4
    smol = select_shapes("smollm2", CPU_MODELS)
    assert smol == [("smollm2", "q_o_proj", 576, 576), ("smollm2", "k_v_proj", 192, 576),
                    ("smollm2", "gate_up_proj", 1536, 576), ("smollm2", "down_proj", 576, 1536)]
    with pytest.raises(ValueError, match="unknown model.s. smollm2 in the shape list; choose from llama-7b"):
        select_shapes("smollm2")


def test_every_model_says_how_many_of_each_shape_a_layer_holds():
    for model, shapes in MODELS.items():
        assert set(PER_LAYER[model]) == set(shapes)
    assert shape_id(("llama-7b", "down_proj", 4096, 11008)) == "llama-7b-down_proj-4096x11008"
