"""Joint pruning + int8 quantization (PruneConfig.quantize="int8"): SparseGPT's in-sweep quantization against a
column-by-column reading of the update rule (SparseGPT section 3.5 / GPTQ), and round-to-grid after the mask for the
other methods, through the layer-sequential engine."""

from __future__ import annotations

import pytest
import torch

from sparsefast.api import prune
from sparsefast.config import MagnitudeConfig, SparseGPTConfig, WandaConfig
from sparsefast.models import get_adapter
from sparsefast.ops.int8_rows import int8_row_scales, quantize_int8_rows
from sparsefast.prune.sparsegpt import sparsegpt_prune_weight
from tests.conftest import tiny_model
from tests.prune.test_owl import calib_ids
from tests.prune.test_sparsegpt import random_problem


def joint_reference(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor,
                    percdamp: float) -> torch.Tensor:
    """Column by column in float64 from the formulas, no lazy batches: column q's weights are set to their target
    (0 where masked, else scale · clamp(round(w / scale), ±127)) and the error is spread over the later columns with
    w -= (w_q - target_q) / [H⁻¹]_qq · H⁻¹[q, :]; then q is removed from H⁻¹ (Schur update)."""
    w, h = w.double().clone(), h.double().clone()
    cols = w.shape[1]
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    s = scales.double()
    for q in range(cols):
        target = torch.where(mask[:, q], 0.0, torch.round(w[:, q] / s).clamp(-127, 127) * s)
        err = (w[:, q] - target) / hinv[q, q]
        w -= err[:, None] * hinv[q][None, :]
        w[:, q] = target
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return w


@pytest.mark.parametrize("sparsity,blocksize", [(0.0, 16), (0.5, 8), (0.5, 128)])
def test_sparsegpt_joint_int8_matches_the_column_rule(sparsity, blocksize):
    w, h = random_problem(rows=8, cols=16, seed=3)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(w.shape, generator=g) < sparsity
    scales = int8_row_scales(w) * 4  # a coarse grid, so rounding errors are large enough to matter
    out, _ = sparsegpt_prune_weight(w, h, sparsity=0.0, blocksize=blocksize, mask=mask, int8_scales=scales)
    ref = joint_reference(w, h, mask, scales, 0.01)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    q, _ = quantize_int8_rows(out, scales)
    assert torch.allclose(q.float() * scales[:, None], out, atol=1e-6)  # on the grid
    assert bool((out[mask] == 0).all())


def test_joint_quantization_beats_rounding_after_pruning():
    """The point of quantizing inside the sweep: the layer's output error is smaller than SparseGPT's fp32 result
    rounded to the same grid afterwards."""
    w, h = random_problem(rows=32, cols=64, tokens=256, seed=5)
    scales = int8_row_scales(w) * 8
    joint, _ = sparsegpt_prune_weight(w, h, sparsity=0.5, nm=(2, 4), blocksize=32, int8_scales=scales)
    plain, _ = sparsegpt_prune_weight(w, h, sparsity=0.5, nm=(2, 4), blocksize=32)
    q, _ = quantize_int8_rows(plain, scales)
    after = q.float() * scales[:, None]

    def err(v):
        d = (v - w).double()
        return float(torch.einsum("ri,ij,rj->", d, h.double(), d))

    assert err(joint) < err(after)


@pytest.mark.parametrize("config_type,pattern", [(SparseGPTConfig, "2:4"), (WandaConfig, "unstructured"),
                                                 (MagnitudeConfig, "2:4")])
def test_engine_quantizes_every_pruned_linear(config_type, pattern):
    calib = calib_ids()
    kwargs = dict(nsamples=4, seqlen=24, batch_size=2, pattern=pattern)
    plain = tiny_model("llama", num_hidden_layers=2)
    prune(plain, config_type(**kwargs), calib, progress=False)
    model = tiny_model("llama", num_hidden_layers=2)
    report = prune(model, config_type(**kwargs, quantize="int8"), calib, progress=False)
    adapter = get_adapter(model)
    names = [n for n, m in model.named_modules() if hasattr(m, "weight_scale")]
    assert names[-1] == "lm_head" and report["lm_head_quantize"]["format"] == "int8-rows"  # the head, never pruned
    assert len(names) - 1 == sum(len(adapter.prunable_linears(layer)) for layer in adapter.decoder_layers(model))
    plain_mods = dict(plain.named_modules())
    for name in names:
        lin = model.get_submodule(name)
        w, s = lin.weight.detach(), lin.weight_scale
        q, _ = quantize_int8_rows(w, s)
        assert torch.equal(q.float() * s[:, None], w), name  # exactly scale · q
        assert int(q.abs().max()) <= 127
        # rounding after the mask: the fp32 result, rounded (for a calibrated method only in layer 0, whose inputs
        # the quantization of earlier layers has not changed)
        if name == "lm_head" or config_type is MagnitudeConfig or (config_type is WandaConfig and
                                                                   ".layers.0." in name):
            ref = plain_mods[name].weight.detach()
            assert torch.equal(quantize_int8_rows(ref)[0], q), name
    stats = next(iter(report["linears"].values()))
    assert stats["quantize"]["format"] == "int8-rows"


def test_bad_quantize_value_is_refused():
    with pytest.raises(ValueError, match="quantize must be one of int8"):
        WandaConfig(quantize="int4")


def test_a_tied_head_is_quantized_with_its_embedding():
    """The head is rounded per row; tied to the token embedding, the embedding is the same tensor, so the model's
    input rows are the dequantized rows too (as in a llama.cpp Q8_0 file)."""
    model = tiny_model("llama", num_hidden_layers=1, tie_word_embeddings=True)
    before = model.lm_head.weight.detach().clone()
    prune(model, MagnitudeConfig(pattern="unstructured", sparsity=0.0, quantize="int8"), progress=False)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    q, scales = quantize_int8_rows(before)
    assert torch.equal(model.lm_head.weight_scale, scales)
    assert torch.equal(model.lm_head.weight.detach(), q.float() * scales[:, None])


def test_an_int8_model_is_refused_where_its_weights_would_leave_the_grid(tmp_path):
    """prune, prune-structured, LoRA recovery and the vLLM exports need the float model: an int8-quantized one is
    refused with one clear error before any work (nothing written); drop_int8_scales makes it a plain float model."""
    from sparsefast.config import RecoverConfig, StructuralConfig
    from sparsefast.export.vllm import export_vllm
    from sparsefast.export.vllm_sparse import export_vllm_sparse
    from sparsefast.ops.int8_rows import drop_int8_scales, quantized_modules
    from sparsefast.prune.structural import prune_structured
    from sparsefast.recover.train import lora_recover

    model = tiny_model("llama", num_hidden_layers=1)
    prune(model, MagnitudeConfig(pattern="unstructured", sparsity=0.0, quantize="int8"), progress=False)
    calls = {"prune": lambda: prune(model, MagnitudeConfig(pattern="2:4"), progress=False),
             "prune-structured": lambda: prune_structured(model, None, StructuralConfig(importance="l2"),
                                                          progress=False),
             "recover": lambda: lora_recover(model, None, [{"input_ids": [1, 2]}], RecoverConfig()),
             "--to vllm": lambda: export_vllm(model, None, tmp_path / "a"),
             "--to vllm-sparse": lambda: export_vllm_sparse(model, None, tmp_path / "b")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for what, call in calls.items():
        with pytest.raises(ValueError, match=f"{what}.* needs a float model, but this one is int8-quantized"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(tmp_path.iterdir())
    names = drop_int8_scales(model)
    assert len(names) == 8 and quantized_modules(model) == [] and "lm_head" in names
    prune(model, MagnitudeConfig(pattern="2:4"), progress=False)  # a float model again
