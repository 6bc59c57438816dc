"""sparsefast.nn.dense_linear: DenseCpuLinear runs over the very Parameters of the layer it replaces (no copy, ties
kept, state dict unchanged) and computes what nn.Linear computes; use_dense_cpu_kernels_ and sparsify_ "auto" swap it
in for every CPU fp32/bf16 linear, "off" leaves the model alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsefast.nn import DenseCpuLinear, SparsifyConfig, sparsify_, use_dense_cpu_kernels_
from tests.conftest import tiny_model
from tests.nn.model_helpers import greedy_generate
from tests.ops.sparse_cpu_helpers import assert_within_rule, require_cpu_kernels


@pytest.mark.parametrize("bias", [False, True])
def test_from_linear_shares_parameters_and_matches_nn_linear(bias):
    require_cpu_kernels()
    linear = nn.Linear(40, 21, bias=bias)
    layer = DenseCpuLinear.from_linear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.state_dict().keys() == linear.state_dict().keys()
    assert (layer.in_features, layer.out_features) == (40, 21)
    with torch.no_grad():
        for m in (1, 3, 8, 20):  # the kernel, then F.linear above the token limit
            x = torch.randn(m, 40)
            assert_within_rule(layer(x), x, linear.weight, linear.bias)
    with pytest.raises(ValueError, match="expected nn.Linear, got DenseCpuLinear"):
        DenseCpuLinear.from_linear(layer)


def test_swap_keeps_the_tied_head_tied_and_greedy_tokens():
    require_cpu_kernels()
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids, steps=6)
    keys = model.state_dict().keys()
    names = use_dense_cpu_kernels_(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(names) == sorted(linears) and "lm_head" in names
    assert all(type(m) is DenseCpuLinear for m in model.modules() if isinstance(m, nn.Linear))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.state_dict().keys() == keys
    assert torch.equal(greedy_generate(model, ids, steps=6), want)
    assert use_dense_cpu_kernels_(model) == []  # nothing left to swap


def test_a_module_registered_twice_gets_one_replacement():
    require_cpu_kernels()
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert use_dense_cpu_kernels_(model) == ["0", "2"]
    assert model[0] is model[2] and type(model[0]) is DenseCpuLinear


def test_only_fp32_bf16_cpu_linears_are_swapped():
    require_cpu_kernels()
    model = nn.Sequential(nn.Linear(8, 8).half(), nn.Linear(8, 8).bfloat16(), nn.Linear(8, 8))
    assert use_dense_cpu_kernels_(model) == ["1", "2"]
    assert type(model[0]) is nn.Linear


def test_sparsify_auto_swaps_dense_layers_and_off_does_not():
    require_cpu_kernels()
    model = tiny_model("llama")
    assert sparsify_(model, SparsifyConfig(mode="off")) == {}
    assert not any(isinstance(m, DenseCpuLinear) for m in model.modules())
    assert sparsify_(model, SparsifyConfig(mode="auto")) == {}  # dense weights: no sparse candidates
    assert all(type(m) is DenseCpuLinear for m in model.modules() if isinstance(m, nn.Linear))
