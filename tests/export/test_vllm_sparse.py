"""sparsefast.export.vllm_sparse: the packed vLLM checkpoint (layouts per vLLM layer, exact packing, config table) and
the tensor-parallel rule its plugin loads with, checked against the unsharded layer through the kernels. vLLM itself
runs it in the slow test of tests/export/test_engines.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsefast.export.vllm_sparse import (
    PACKED_NAMES,
    choose_layouts,
    export_vllm_sparse,
    linear_groups,
    pack,
    rank_slice,
    unpack,
)
from sparsefast.ops.sparse24 import to_sparse24_by_magnitude
from tests.ops.sparse_cpu_helpers import random_unstructured, require_cpu_kernels


def _prune_(story, plan: dict[str, str]) -> None:
    """Zero the story llama's linears in place: {suffix: "2:4" | "50%" | "dense"} per linear name suffix."""
    model, _ = story
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            kind = plan.get(name.rsplit(".", 1)[-1])
            if not isinstance(module, torch.nn.Linear) or kind in (None, "dense"):
                continue
            w = module.weight
            if kind == "2:4":
                w.copy_(to_sparse24_by_magnitude(w))
            else:
                w.mul_(torch.rand(w.shape, generator=gen) >= 0.5)


def test_groups_are_vllm_layers(story):
    groups = linear_groups(story[0])
    assert groups[:4] == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"]]
    assert len(groups) == 4 * len(story[0].model.layers)


def test_group_layout_rule(story):
    """A group is 2:4 only when every member is; a member that is sparse but not 2:4 makes it unstructured; a
    group most of whose weights are dense stays dense."""
    model, _ = story
    _prune_(story, {"q_proj": "2:4", "k_proj": "50%", "v_proj": "2:4", "o_proj": "2:4", "gate_proj": "2:4",
                    "down_proj": "50%"})
    layouts = choose_layouts(model, calibrate=False)
    assert layouts["model.layers.0.self_attn.q_proj"] == layouts["model.layers.0.self_attn.k_proj"] == "unstructured"
    assert layouts["model.layers.0.self_attn.o_proj"] == "2:4"
    assert layouts["model.layers.1.mlp.down_proj"] == "unstructured"
    assert "model.layers.0.mlp.gate_proj" not in layouts and "model.layers.0.mlp.up_proj" not in layouts  # up dense


def test_export_packs_exactly(story, tmp_path):
    model, tok = story
    _prune_(story, {"q_proj": "2:4", "k_proj": "2:4", "v_proj": "2:4", "o_proj": "50%", "gate_proj": "2:4",
                    "up_proj": "2:4", "down_proj": "dense"})
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    summary = export_vllm_sparse(model, tok, tmp_path / "out", calibrate=False)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "sparsefast" and qc["format_version"] == 1
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in state  # tied: vLLM ties it to the embedding
    n_layers = len(model.model.layers)
    assert summary["packed_layers"] == {"2:4": 5 * n_layers, "unstructured": n_layers}
    for i in range(n_layers):
        assert f"model.layers.{i}.mlp.down_proj.weight" in state  # dense
        for short, layout in (("self_attn.q_proj", "2:4"), ("self_attn.o_proj", "unstructured"),
                              ("mlp.up_proj", "2:4")):
            name = f"model.layers.{i}.{short}"
            assert qc["layers"][name] == {"layout": layout, "shape": list(weights[name].shape)}
            assert f"{name}.weight" not in state
            packed = tuple(state[f"{name}.{t}"] for t in PACKED_NAMES[layout])
            assert torch.equal(unpack(packed, layout, *weights[name].shape), weights[name])
    report = json.loads((out / "sparsefast.json").read_text())
    assert report["packed_bytes"] < report["packed_dense_bytes"]


def test_bf16_and_bad_outtype(story, tmp_path):
    model, tok = story
    _prune_(story, {"q_proj": "2:4", "k_proj": "2:4", "v_proj": "2:4"})
    with pytest.raises(ValueError, match="f32, bf16"):
        export_vllm_sparse(model, tok, tmp_path / "f16", outtype="f16", calibrate=False)
    assert not (tmp_path / "f16").exists()
    export_vllm_sparse(model, tok, tmp_path / "bf16", outtype="bf16", calibrate=False)
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert state["model.layers.0.self_attn.q_proj.values"].dtype == torch.bfloat16
    assert state["model.layers.0.self_attn.q_proj.meta"].dtype == torch.int32


@pytest.mark.parametrize("layout", ["2:4", "unstructured"])
def test_tensor_parallel_rule_matches_the_unsharded_layer(layout):
    """Two ranks, as vLLM splits its layers: qkv (q 64 rows, k and v 16 rows each; 4 ranks so that K/V heads are
    shared by 2 of them) and a row-parallel layer; each rank's packed slice through the kernel, put together as vLLM
    does (concatenated outputs / summed partial outputs), equals the whole layer."""
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(1)

    def weight(out_f, in_f):
        w = torch.randn(out_f, in_f, generator=gen)
        return to_sparse24_by_magnitude(w) if layout == "2:4" else random_unstructured(out_f, in_f, 0.6, gen)

    def kernel(w, x):
        op = (torch.ops.sparsefast.sparse24_linear_cpu if layout == "2:4"
              else torch.ops.sparsefast.sparse_unstructured_linear_cpu)
        return op(x, *pack(w, layout), None, w.shape[0], w.shape[1], 0, None, False)

    x = torch.randn(3, 128, generator=gen)
    q, k, v = weight(64, 128), weight(16, 128), weight(16, 128)
    tp, kv_replicas = 4, 2  # 4 ranks over 2 KV heads of 8 rows each
    outs = []
    for rank in range(tp):
        parts = [rank_slice(q, rank=rank, row_parallel=False, size=16),
                 rank_slice(k, rank=rank, row_parallel=False, size=8, kv_replicas=kv_replicas),
                 rank_slice(v, rank=rank, row_parallel=False, size=8, kv_replicas=kv_replicas)]
        y = kernel(torch.cat(parts), x)
        outs.append(y.split([16, 8, 8], dim=1))
    torch.testing.assert_close(torch.cat([o[0] for o in outs], dim=1), x @ q.T, rtol=1e-5, atol=1e-5)
    for j, member in ((1, k), (2, v)):
        for rank in range(tp):  # rank r holds KV head r // 2
            head = rank // kv_replicas
            torch.testing.assert_close(outs[rank][j], x @ member[8 * head:8 * head + 8].T, rtol=1e-5, atol=1e-5)
    down = weight(32, 128)
    partial = sum(kernel(rank_slice(down, rank=r, row_parallel=True, size=64), x[:, 64 * r:64 * r + 64])
                  for r in range(2))
    torch.testing.assert_close(partial, x @ down.T, rtol=1e-5, atol=1e-5)
