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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_layer_runs_its_q_for_few_tokens_and_the_float_weight_above(dtype):
    """A linear with a weight_scale (weight = scale · q) reads int8 q through the kernel for M <= 8, bitwise what the
    kernel gives on q, and F.linear on the float weight above; the state dict keeps weight and weight_scale only."""
    require_cpu_kernels()
    from sparsefast.ops.dense_cpu import DENSE_KERNEL_MAX_TOKENS
    from sparsefast.ops.int8_rows import SCALE_BUFFER, dequantize_int8_rows, quantize_int8_rows

    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(48, 24, dtype=dtype)
    q, scales = quantize_int8_rows(torch.randn(24, 48, generator=gen))
    with torch.no_grad():
        linear.weight.copy_(dequantize_int8_rows(q, scales, dtype))
    linear.register_buffer(SCALE_BUFFER, scales)
    layer = DenseCpuLinear.from_linear(linear)
    assert torch.equal(layer.qweight, q) and layer.weight is linear.weight
    assert set(layer.state_dict()) == {"weight", "bias", SCALE_BUFFER}
    with torch.no_grad():
        for m in (1, 5, DENSE_KERNEL_MAX_TOKENS):
            x = torch.randn(m, 48, generator=gen).to(dtype)
            want = torch.ops.sparsefast.dense_linear_cpu(x, q, linear.bias, 0, scales, False)
            assert torch.equal(layer(x), want), m
            assert [t.dtype for t in layer.tensors_read(x)][:2] == [torch.int8, torch.float32]
        x = torch.randn(DENSE_KERNEL_MAX_TOKENS + 1, 48, generator=gen).to(dtype)
        assert torch.equal(layer(x), torch.nn.functional.linear(x, linear.weight, linear.bias))
        assert layer.tensors_read(x)[0] is linear.weight


def test_sparsify_auto_runs_an_int8_quantized_dense_model_on_q():
    """An int8-only model (prune --quantize int8 at sparsity 0) served with sparse="auto": every linear with a
    weight_scale reads int8 q, and greedy tokens equal the float model's."""
    require_cpu_kernels()
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig

    model = tiny_model("llama")
    prune(model, MagnitudeConfig(pattern="unstructured", sparsity=0.0, quantize="int8", device="cpu"),
                progress=False)
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids, steps=6)
    assert sparsify_(model, SparsifyConfig(mode="auto")) == {}
    int8 = [m for m in model.modules() if isinstance(m, DenseCpuLinear) and m.qweight is not None]
    assert len(int8) == 7 * model.config.num_hidden_layers + 1  # q k v o gate up down, and the head
    assert torch.equal(greedy_generate(model, ids, steps=6), want)
