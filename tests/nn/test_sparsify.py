"""sparsify_ and SparsifyConfig: the measured CPU choice of a layer (choose_sparse_layer), each mode (auto on CPU,
sparse24, off), filters, the README's swap_linear_with_sparse alias, sparsefast.load(sparse=...), and greedy-token
equality of swapped models with their dense-with-zeros selves, under transformers' generate and the serving engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefast.nn import (
    DenseCpuLinear,
    Sparse24Linear,
    SparseLinear,
    SparsifyConfig,
    sparsify_,
    swap_linear_with_sparse,
    swapped_layer_names,
)
from sparsefast.nn.dispatch import DEFAULT_CPU_DISPATCH
from sparsefast.nn.sparsify import choose_sparse_layer
from tests.conftest import tiny_model
from tests.nn.model_helpers import greedy_generate, prune_linears, pruned_linear
from tests.ops.sparse_cpu_helpers import assert_within_rule, require_cpu_kernels
from tests.serve.test_engine import GREEDY, PROMPTS, reference, served_alone


def test_choose_sparse_layer_is_measured_and_never_worse_than_its_table():
    require_cpu_kernels()
    lin = pruned_linear(256, 512, 0.9, seed=1)
    layer, record = choose_sparse_layer(lin)
    assert record["candidates"]["unstructured"]["timings"].keys() == {1, 4, 16, 64}
    if record["chosen"] == "dense":
        assert layer is lin
        return
    assert isinstance(layer, SparseLinear) and layer.layout == record["chosen"]
    assert layer.dispatch.source.startswith("measured here")
    for m, t in record["candidates"][layer.layout]["timings"].items():
        assert layer.dispatch.backend_for(m) == ("cpu" if t["kernel_ms"] <= 0.95 * t["dense_ms"] else "dense")
    assert (layer.dense is not None) == any(b == "dense" for _, b in layer.dispatch.rows)
    x = torch.randn(3, 512)
    assert_within_rule(layer(x), x, lin.weight.detach(), lin.bias.detach())


@pytest.mark.parametrize("sparsity", [None, 0.7])
def test_choose_sparse_layer_gives_the_calibration_new_packed_copies(monkeypatch, sparsity):
    """choose_sparse_layer's kernel_copy makes a new layer over new packed tensors each call, of kernel_bytes,
    computing the same linear."""
    lin = pruned_linear(32, 64, sparsity, seed=3)
    seen: dict[str, list] = {}
    created: list[SparseLinear] = []
    init = SparseLinear.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(SparseLinear, "__init__", recording_init)

    def spy(kernel_copy, kernel_bytes, dense_weight, *, key, dense_scales, int8_activations):
        assert dense_scales is None and not int8_activations  # a float layer: the float dense baseline
        before = len(created)
        kernels = [kernel_copy() for _ in range(3)]
        layers = created[before:]  # the layer each kernel_copy() made
        assert len(layers) == 3
        ptrs = {t.data_ptr() for m in layers for t in m.packed()}
        assert len(ptrs) == 3 * len(layers[0].packed())  # every copy's tensors are its own
        assert kernel_bytes == sum(t.numel() * t.element_size() for t in layers[0].packed())
        x = torch.randn(3, 64)
        for k in kernels:
            torch.testing.assert_close(k(x), F.linear(x, dense_weight, lin.bias.detach()), atol=1e-4, rtol=1e-4)
        seen[key[2]] = layers
        return DEFAULT_CPU_DISPATCH, {m: {"kernel_ms": 1.0, "dense_ms": 2.0} for m in (1, 4)}

    monkeypatch.setattr("sparsefast.nn.sparsify.calibrate_cpu_dispatch", spy)
    layer, record = choose_sparse_layer(lin)
    assert set(seen) == ({"2:4", "unstructured"} if sparsity is None else {"unstructured"})
    assert isinstance(layer, SparseLinear) and record["chosen"] in seen


def test_config_modes_and_off():
    with pytest.raises(ValueError, match="sparse must be one of auto, sparse24, off"):
        SparsifyConfig(mode="on")
    model = tiny_model("llama", seed=4)
    prune_linears(model, None)
    assert sparsify_(model, SparsifyConfig(mode="off")) == {}
    assert not any(isinstance(m, (Sparse24Linear, SparseLinear)) for m in model.modules())
    assert swapped_layer_names({"a": {"chosen": "dense"}, "b": {"chosen": "2:4"}, "c": {"chosen": "sparse24"}}) == \
        ["b", "c"]


def test_auto_refuses_layers_on_devices_without_kernels():
    model = nn.Sequential(nn.Linear(8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"layer '0' is on meta; mode 'auto' swaps CUDA and CPU layers only"):
        sparsify_(model)


def test_the_cpu_swap_alias_refuses_layers_elsewhere_before_swapping():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"swaps CPU layers only; layer '1' is on meta: use sparsefast.nn.sparsify_"):
        swap_linear_with_sparse(model)
    assert all(type(m) is nn.Linear for m in model)


def test_sparse24_mode_keeps_greedy_tokens_of_tiny_llama():
    model = tiny_model("llama", seed=1)
    prune_linears(model, None)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids, steps=8)
    records = sparsify_(model, SparsifyConfig(mode="sparse24"))
    names = swapped_layer_names(records)
    assert len(names) == 2 * 7 and all("lm_head" not in n for n in names)
    assert all(r["chosen"] == "sparse24" for r in records.values())
    assert isinstance(model.model.layers[0].mlp.down_proj, Sparse24Linear)
    assert torch.equal(greedy_generate(model, ids, steps=8), want)


def test_sparse24_mode_takes_the_dispatch_table_file(tmp_path):
    table = tmp_path / "table.json"
    table.write_text('{"rows": [[8, "cuda"], [4611686018427387904, "dense"]]}')
    model = tiny_model("llama", seed=1)
    prune_linears(model, None)
    sparsify_(model, SparsifyConfig(mode="sparse24", dispatch_table=table))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Sparse24Linear)
    assert layer.dispatch.rows == ((8, "cuda"), (2**62, "dense")) and layer.dispatch.source == str(table)
    with pytest.raises(ValueError, match="dispatch_table .* is not a file"):
        SparsifyConfig(dispatch_table=tmp_path / "missing.json")


def test_sparse24_filter_rejects_non_24_before_swapping():
    model = tiny_model("llama", seed=2)
    with pytest.raises(ValueError, match="layer 'model.layers.0.self_attn.q_proj'"):
        sparsify_(model, SparsifyConfig(mode="sparse24"), lambda name, mod: "q_proj" in name)
    assert not any(isinstance(m, Sparse24Linear) for m in model.modules())


@pytest.mark.parametrize("sparsity,layout", [(None, "2:4"), (0.7, "unstructured")])
def test_swapped_story_llama_generates_the_same_greedy_tokens(story_llama_dir, sparsity, layout):
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    prune_linears(model, sparsity)
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, ids)
    records = sparsify_(model, SparsifyConfig(calibrate=False))  # every pruned linear gets its kernel
    assert len(records) == 2 * 7 and all(r["chosen"] == layout for r in records.values())
    swapped = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14 and all(m.backend_for(torch.empty(1, m.in_features)) == "cpu" for m in swapped)
    assert isinstance(model.lm_head, nn.Linear)  # dense head left alone
    assert torch.equal(greedy_generate(model, ids), want)


def test_calibrated_swap_keeps_greedy_tokens(story_llama_dir):
    """Through swap_linear_with_sparse, the name the README documents for this swap."""
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    prune_linears(model, None)
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    want = greedy_generate(model, ids, steps=8)
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    records = swap_linear_with_sparse(model, lambda name, mod: "mlp" in name)
    assert set(records) == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")}
    assert all(r["chosen"] in ("dense", "2:4", "unstructured") for r in records.values())
    assert torch.equal(greedy_generate(model, ids, steps=8), want)
    x = torch.randn(2, 128)
    q = model.model.layers[0].self_attn.q_proj
    # a layer left dense runs the dense CPU kernel over its own Parameter (sparsefast.nn.dense_linear)
    assert type(q) is DenseCpuLinear and q.weight is q_weight
    torch.testing.assert_close(q(x), F.linear(x, q.weight, q.bias))


def test_load_with_sparse_auto_swaps_a_mask_pruned_checkpoint(tmp_path, story_llama_dir):
    require_cpu_kernels()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsefast

    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    prune_linears(model, 0.7)
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(story_llama_dir).save_pretrained(tmp_path / "pruned")
    with pytest.raises(ValueError, match="sparse must be one of"):
        sparsefast.load(tmp_path / "missing", sparse="yes")  # checked before anything is read
    dense, _ = sparsefast.load(tmp_path / "pruned")
    swapped, _ = sparsefast.load(tmp_path / "pruned", sparse="auto")
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    ids = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(greedy_generate(swapped, ids, steps=8), greedy_generate(dense, ids, steps=8))


def test_sparse24_swap_decodes_the_same_tokens_in_the_engine(story_llama_dir):
    """Mode "sparse24" puts Sparse24Linear in every 2:4 linear; the serving engine then runs those modules and still
    matches generate on the unswapped 2:4 model. A dense model is left alone by "auto"."""
    from sparsefast.api import load, prune
    from sparsefast.config import MagnitudeConfig

    dense_model, _ = load(story_llama_dir)
    assert sparsify_(dense_model) == {}
    model, tok = load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    expected = [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]
    swapped = swapped_layer_names(sparsify_(model, SparsifyConfig(mode="sparse24")))
    assert len(swapped) == 14 and isinstance(model.model.layers[1].mlp.up_proj, Sparse24Linear)
    assert served_alone(model, tok, PROMPTS[:2]) == expected


def test_cpu_auto_swaps_only_to_sparse_linears_and_decodes_the_same_in_the_engine(story_llama_dir):
    """CPU "auto": the measured swap (SparseLinear where its kernel wins on this machine) on a 2:4 model; whatever
    it chose, the engine's greedy tokens equal generate on the model before the swap."""
    from sparsefast.api import load, prune
    from sparsefast.config import MagnitudeConfig

    model, tok = load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    expected = [reference(model, tok, p, GREEDY.max_tokens) for p in PROMPTS[:2]]
    for name in swapped_layer_names(sparsify_(model)):
        assert isinstance(model.get_submodule(name), SparseLinear), name
    assert served_alone(model, tok, PROMPTS[:2]) == expected
