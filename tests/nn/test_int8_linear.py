"""int8-quantized pruned linears in the CPU kernels: `prune --quantize int8` → save → `sparsefast.load(sparse=...)`
reads the saved scales and swaps in SparseLinear layers with int8 values, whose outputs equal the dequantized model's
(the checkpoint as any engine reads it) within fp32 rounding; a weight_scale that does not match its weight is
refused at load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsefast
from sparsefast.cli import main
from sparsefast.nn import SparseLinear
from tests.ops.sparse_cpu_helpers import require_cpu_kernels

STORY = "Once upon a time there was a little fox who lived in the forest with her family. " * 40


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory, story_llama_dir):
    tmp = tmp_path_factory.mktemp("int8")
    (tmp / "calib.txt").write_text(STORY)
    out = tmp / "out"
    assert main(["prune", str(story_llama_dir), "--method", "sparsegpt", "--pattern", "2:4", "--quantize", "int8",
                 "--calib", str(tmp / "calib.txt"), "--nsamples", "2", "--seqlen", "64", "--device", "cpu",
                 "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_int8_layers_match_the_dequantized_model(int8_checkpoint, dtype):
    require_cpu_kernels()
    plain, tok = sparsefast.load(int8_checkpoint, dtype=dtype)
    model, _ = sparsefast.load(int8_checkpoint, dtype=dtype, sparse="auto")
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert swapped and all(m.values.dtype == torch.int8 and m.scales is not None for m in swapped)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        for n in (ids.shape[1], 1):  # prefill and one decode-sized step
            a, b = plain(ids[:, :n]).logits.float(), model(ids[:, :n]).logits.float()
            tol = 1e-3 if dtype == torch.float32 else 0.1
            assert (a - b).abs().max() <= tol * a.abs().max()
    for m in swapped:  # the kernel's weight is the checkpoint's dequantized weight
        name = next(n for n, mod in model.named_modules() if mod is m)
        assert torch.equal(m.dense_weight().to(dtype), plain.get_submodule(name).weight.detach())


def _edited_copy(int8_checkpoint, tmp_path, edit) -> str:
    """A copy of the checkpoint (its own output record left out) whose tensors `edit` changed in place."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in int8_checkpoint.iterdir():
        if f.is_file() and not f.name.startswith("sparsefast-output"):
            (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return str(bad)


def test_a_scale_of_no_linear_is_refused(int8_checkpoint, tmp_path):
    """A weight_scale that names no linear of the loaded model (renamed, or a module transformers loads under
    another name) is refused, never dropped: the layer would silently run as float."""
    def rename(tensors):
        key = next(k for k in tensors if k.endswith("_proj.weight_scale"))
        tensors[key.replace("_proj.weight_scale", "_nothing.weight_scale")] = tensors.pop(key)

    with pytest.raises(ValueError, match="_nothing.weight_scale name no linear"):
        sparsefast.load(_edited_copy(int8_checkpoint, tmp_path, rename))


def test_a_scale_that_does_not_match_is_refused(int8_checkpoint, tmp_path):
    def scale_up(tensors):
        key = next(k for k in tensors if k.endswith(".weight_scale"))
        tensors[key] = tensors[key] * 1.3

    with pytest.raises(ValueError, match="weight_scale does not match its weight"):
        sparsefast.load(_edited_copy(int8_checkpoint, tmp_path, scale_up))


def test_the_load_report_listing_only_int8_scales_is_not_printed():
    """transformers' LOAD REPORT of an int8 checkpoint lists the weight_scale tensors as UNEXPECTED (sparsefast
    reads them itself): dropped; a report with any other row is kept."""
    import logging

    from sparsefast.models.loading import _Int8ScaleReportFilter

    def record(rows: list[str]) -> logging.LogRecord:
        table = "Key | Status |  | \n----+----+--+-\n" + "\n".join(rows) + "\n\nNotes:\n- UNEXPECTED: can be ignored"
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                                 "LlamaForCausalLM LOAD REPORT from: x\n" + table, None, None)

    quiet = _Int8ScaleReportFilter()
    scales = ["model.layers.{0...29}.mlp.up_proj.weight_scale | UNEXPECTED |  | ",
              "lm_head.weight_scale                          | UNEXPECTED |  | "]
    assert not quiet.filter(record(scales))
    coloured = [row.replace("UNEXPECTED", "\x1b[38;5;208mUNEXPECTED\x1b[0m") for row in scales]  # on a terminal
    assert not quiet.filter(record(coloured))
    assert quiet.filter(record(scales + ["model.layers.0.mlp.up_proj.weight | MISSING |  | "]))
    assert quiet.filter(record(["model.extra.bias | UNEXPECTED |  | "]))
    assert quiet.filter(logging.LogRecord("t", logging.WARNING, __file__, 1, "another warning", None, None))


def test_an_int8_layer_is_timed_and_run_against_the_int8_dense_route(monkeypatch):
    """For an int8 layer the dense baseline is the int8 dense kernel (few tokens): the swap times the sparse kernel
    against it (dense_scales = the layer's scales), and a kept dense weight's rows run it on the weight's q."""
    require_cpu_kernels()
    import torch.nn.functional as F

    from sparsefast.nn import DispatchTable, sparsify
    from sparsefast.ops.int8_rows import SCALE_BUFFER, dequantize_int8_rows, quantize_int8_rows
    from tests.nn.model_helpers import pruned_linear

    lin = pruned_linear(24, 48, None, seed=2)  # 2:4
    q, scales = quantize_int8_rows(lin.weight.detach())
    with torch.no_grad():
        lin.weight.copy_(dequantize_int8_rows(q, scales))
    lin.register_buffer(SCALE_BUFFER, scales)
    given = {}
    real = sparsify.calibrate_cpu_dispatch

    def spy(*args, dense_scales=None, **kwargs):
        given["scales"] = dense_scales
        return real(*args, dense_scales=dense_scales, **kwargs)

    monkeypatch.setattr(sparsify, "calibrate_cpu_dispatch", spy)
    sparsify.choose_sparse_layer(lin)
    assert torch.equal(given["scales"], scales)
    layer = SparseLinear.from_dense(lin, "2:4", dispatch=DispatchTable(((2**62, "dense"),)), keep_dense=True)
    assert torch.equal(layer.dense_q, q) and "dense_q" not in layer.state_dict()
    x = torch.randn(1, 48)
    assert torch.equal(layer(x), torch.ops.sparsefast.dense_linear_cpu(x, q, layer.bias, 0, scales, False))
    assert layer.tensors_read(x)[:2] == [layer.dense_q, layer.scales]
    x = torch.randn(9, 48)  # above the dense kernel's token limit: F.linear on the float weight
    assert torch.equal(layer(x), F.linear(x, lin.weight, layer.bias))


def _twin_model(int8_checkpoint, dtype=torch.float32):
    """The checkpoint with every int8 linear's forward replaced by the torch twin of int8 activations."""
    from sparsefast.ops.int8_rows import SCALE_BUFFER, int8_activation_linear, quantize_int8_rows

    model, tok = sparsefast.load(int8_checkpoint, dtype=dtype)
    for mod in model.modules():
        scales = getattr(mod, SCALE_BUFFER, None)
        if isinstance(mod, torch.nn.Linear) and scales is not None:
            q = quantize_int8_rows(mod.weight.detach(), scales)[0]
            mod.forward = lambda x, q=q, s=scales.float(), b=mod.bias: int8_activation_linear(x, q, s, b)
    return model, tok


def test_int8_activations_through_load_equal_the_twin_model(int8_checkpoint):
    """`load(sparse="auto", int8_activations=True)`: every int8 layer (sparse kernels, dense kernel, LM head) runs
    with x quantized per token and block, and the logits match those of the model whose int8 linears are the torch
    twin within fp32 rounding, for a prefill and a decode-sized step (kernels where this CPU has them, the twin
    elsewhere); the weight-only model differs by far more."""
    from sparsefast.nn import DenseCpuLinear

    model, tok = sparsefast.load(int8_checkpoint, sparse="auto", int8_activations=True)
    layers = [m for m in model.modules() if isinstance(m, (SparseLinear, DenseCpuLinear))]
    assert layers and all(m.int8_activations for m in layers)
    assert any(isinstance(m, SparseLinear) for m in layers) and isinstance(model.lm_head, DenseCpuLinear)
    twin, _ = _twin_model(int8_checkpoint)
    plain, _ = sparsefast.load(int8_checkpoint)
    ids = tok("Once upon a time there was a fox", return_tensors="pt").input_ids
    with torch.no_grad():
        for n in (ids.shape[1], 1):
            got, want = model(ids[:, :n]).logits, twin(ids[:, :n]).logits
            weight_only = plain(ids[:, :n]).logits  # a different model: the activations really were rounded
            off = (got - want).abs().max()
            assert off <= 1e-4 * want.abs().max()
            assert 10 * off < (got - weight_only).abs().max() <= 0.1 * weight_only.abs().max()


def test_int8_activations_are_refused_where_they_cannot_apply(story_llama_dir):
    from sparsefast.nn import SparsifyConfig, sparsify_

    with pytest.raises(ValueError, match="sparse mode 'auto', not 'sparse24'"):
        SparsifyConfig(mode="sparse24", int8_activations=True)
    model, _ = sparsefast.load(story_llama_dir)
    with pytest.raises(ValueError, match="need an int8-quantized model"):
        sparsify_(model, SparsifyConfig(int8_activations=True))
    with pytest.raises(ValueError, match="int8 activations need int8 weights"):
        SparseLinear.from_dense(torch.nn.Linear(32, 8), "unstructured", int8_activations=True)


def test_compiled_step_equals_eager_with_int8_activations(int8_checkpoint):
    """The compiled decode step with the int8-activation ops inside the graph: greedy output token for token."""
    require_cpu_kernels()
    from tests.serve.test_compiled import MAX_TOKENS, PROMPTS, served

    model, tok = sparsefast.load(int8_checkpoint, sparse="auto", int8_activations=True)
    assert all(m.int8_activations for m in model.modules() if hasattr(m, "int8_activations"))
    args = dict(max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    eager, _ = served(model, tok, "off", **args)
    compiled, engine = served(model, tok, "on", **args)
    assert compiled == eager and engine.runner.graphs == 2


def test_int8_activations_without_their_kernels_run_the_twin_even_while_timing(int8_checkpoint, monkeypatch):
    """On a CPU below avx512vbmi (simulated) the load-time timing and every route take the torch twin: the swap
    works and the model equals the twin model."""
    from sparsefast.nn import sparsify as sparsify_module
    from sparsefast.ops import dense_cpu, sparse24_cpu

    for module in (sparsify_module, dense_cpu, sparse24_cpu):
        monkeypatch.setattr(module, "int8_activation_kernels", lambda isa=None: False)
    model, tok = sparsefast.load(int8_checkpoint, sparse="auto", int8_activations=True)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    twin, _ = _twin_model(int8_checkpoint)
    ids = tok("Once upon a time there was a fox", return_tensors="pt").input_ids
    with torch.no_grad():
        for n in (ids.shape[1], 1):
            torch.testing.assert_close(model(ids[:, :n]).logits, twin(ids[:, :n]).logits, rtol=1e-5, atol=1e-5)


def test_int8_activations_refuse_a_float16_model(int8_checkpoint):
    with pytest.raises(ValueError, match="float32 or bfloat16 models"):
        sparsefast.load(int8_checkpoint, dtype="float16", sparse="auto", int8_activations=True)
