"""Sparse24Linear: from_dense, dispatch table, swap helper, and greedy-token equality of a swapped tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsefast.nn import DispatchTable, Sparse24Linear, load_dispatch_table, swap_linear_with_sparse24
from sparsefast.ops.sparse24 import to_sparse24_by_magnitude
from tests.conftest import tiny_model


def _prune_model_24(model: nn.Module) -> None:
    with torch.no_grad():
        for name, mod in model.named_modules():
            if type(mod) is nn.Linear and "lm_head" not in name:
                mod.weight.copy_(to_sparse24_by_magnitude(mod.weight))


def _greedy(model, ids, steps=8):
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_linear(bias):
    lin = nn.Linear(72, 40, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(to_sparse24_by_magnitude(lin.weight))
    sp = Sparse24Linear.from_dense(lin)
    x = torch.randn(3, 5, 72)
    from sparsefast._ext import load_cpu_extension

    assert sp.backend_for(x) == ("cpu" if load_cpu_extension() else "dense")  # CPU kernels for M <= 64
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    x_many = torch.randn(65, 72)  # above the default CPU table: dense F.linear on the unpacked weight
    assert sp.backend_for(x_many) == "dense" and torch.equal(sp(x_many), lin(x_many))
    assert "in_features=72" in repr(sp)


def test_from_dense_rejects_dense_weight():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        Sparse24Linear.from_dense(nn.Linear(8, 4))


def test_dispatch_table_rows_and_loading(tmp_path):
    table = DispatchTable(((16, "cuda"), (1024, "semi_structured"), (2**62, "dense")))
    assert [table.backend_for(m) for m in (1, 16, 17, 1024, 5000)] == ["cuda", "cuda", "semi_structured",
                                                                       "semi_structured", "dense"]
    with pytest.raises(ValueError, match="unknown backend"):
        DispatchTable(((4, "cublas"),))
    with pytest.raises(ValueError, match="increase"):
        DispatchTable(((8, "cuda"), (8, "dense")))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rows": [[32, "cuda"], [4096, "semi_structured"]], "device": "x"}))
    assert load_dispatch_table(path).backend_for(100) == "semi_structured"
    with pytest.raises(FileNotFoundError):
        load_dispatch_table(tmp_path / "missing.json")


def test_default_dispatch_by_device_family(monkeypatch, tmp_path):
    from sparsefast.nn import sparse24_linear as S

    assert S.device_family("NVIDIA H100 80GB HBM3") == "h100" and S.device_family("NVIDIA H200") == "h200"
    assert S.device_family("NVIDIA A100-SXM4-80GB") is None
    monkeypatch.delenv(S.TABLE_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    shipped = S.default_dispatch(cuda)
    assert shipped.source.endswith("dispatch_tables/h100.json")
    assert shipped.rows == tuple((m, b) for m, b in json.loads((S.SHIPPED_TABLES / "h100.json").read_text())["rows"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert S.default_dispatch(cuda) is S.DEFAULT_DISPATCH  # no table measured for this family
    assert S.default_dispatch(torch.device("cpu")) is S.DEFAULT_DISPATCH
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rows": [[4, "dense"], [8, "cuda"]]}))
    monkeypatch.setenv(S.TABLE_ENV, str(path))  # the override wins over the shipped table
    assert S.default_dispatch(cuda).rows == ((4, "dense"), (8, "cuda"))
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(to_sparse24_by_magnitude(lin.weight))
    layer = Sparse24Linear.from_dense(lin)
    assert layer.dispatch is None and "chosen at the first CUDA call" in repr(layer)
    assert layer.backend_for(torch.randn(2, 16)) != "cuda" and layer.dispatch is None  # CPU input: no CUDA table


def test_swap_tiny_llama_same_greedy_tokens():
    model = tiny_model("llama", seed=1)
    _prune_model_24(model)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    want = _greedy(model, ids)
    names = swap_linear_with_sparse24(model)
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    assert isinstance(model.model.layers[0].mlp.down_proj, Sparse24Linear)
    assert torch.equal(_greedy(model, ids), want)


def test_swap_filter_rejects_non_24_before_swapping():
    model = tiny_model("llama", seed=2)
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj'"):
        swap_linear_with_sparse24(model, lambda name, mod: "q_proj" in name)
    assert not any(isinstance(m, Sparse24Linear) for m in model.modules())


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swap_tiny_llama_gpu_greedy(dtype):
    from sparsefast._ext import load_extension

    if load_extension() is None:
        pytest.skip("sparsefast._C not built")
    model = tiny_model("llama", seed=3, hidden_size=128, intermediate_size=256).to("cuda", dtype)
    _prune_model_24(model)
    ids = torch.randint(0, 256, (1, 8), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    want = _greedy(model, ids, steps=12)
    with torch.no_grad():
        ref_logits = model(want).logits.float()
    swap_linear_with_sparse24(model)
    lin = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    assert all(m.backend_for(torch.empty(1, 8, m.in_features, device="cuda", dtype=dtype)) == "cuda" for m in lin)
    with torch.no_grad():
        logits = model(want).logits.float()
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05  # positions that are not numerical near-ties
    assert torch.equal(logits.argmax(-1)[clear], ref_logits.argmax(-1)[clear])
    assert (logits - ref_logits).abs().max() < (0.05 if dtype == torch.float16 else 0.3)
    if bool(clear[:, ids.shape[1] - 1:-1].all()):
        assert torch.equal(_greedy(model, ids, steps=12), want)
