"""`sparsefast prune-structured --from-disk`: LLM-Pruner's block-wise pruning with the decoder layers kept on disk (the
gradients computed one layer at a time, each layer then sliced and written) gives the fully-loaded checkpoint byte
for byte, for every importance and option of the block strategy; the requests it cannot serve are refused before any
work with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from sparsefast.cli import main
from sparsefast.config.structural import StructuralConfig
from sparsefast.models.safetensors_stream import INDEX_FILE
from sparsefast.models.streamed import open_streamed, plan_streamed
from sparsefast.prune.structural import build_graph
from sparsefast.prune.structural.importance import unit_importance
from sparsefast.prune.structural.strategies import plan_candidates
from tests.conftest import tiny_model

COMMON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def prune_structured(src, out, mode, args, calib, capsys):
    code = main(["prune-structured", str(src), *args, "--calib", str(calib), "--nsamples", "3", "--seqlen", "32",
                 "--out", str(out), "--from-disk", mode, "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def assert_same_checkpoint(a, b):
    names = {p.name for p in a.iterdir()} - {"sparsefast.json"}  # the report holds times; compared below
    assert names == {p.name for p in b.iterdir()} - {"sparsefast.json"}
    assert set(COMMON) <= names
    for name in sorted(names):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "sparsefast.json").read_text()) for d in (a, b))
    assert ra["removed"] == rb["removed"] and ra["after"] == rb["after"] and ra["layers"] == rb["layers"]
    assert ra["importance"].get("calib_loss") == rb["importance"].get("calib_loss")
    assert "from_disk" in ra and "from_disk" not in rb


@pytest.mark.parametrize("args", [
    ["--layers", "0-1"],                                                      # element1, local, GQA divisible
    ["--layers", "0-1", "--importance", "element2", "--ranking", "global"],  # the Fisher term, one global ranking
    ["--layers", "0-1", "--importance", "mix", "--gqa", "kv_groups", "--aggregation", "max"],
    ["--layers", "1-1", "--importance", "vector", "--no-mlp", "--ratio", "0.5"],  # the top layer only
    ["--layers", "0-0", "--importance", "l2", "--ratio", "0.5"],             # no gradients: one read per layer
    ["--uniform", "--ratio", "0.25"],                                         # a plain config, no structure.json
    ["--layers", "0-1", "--dtype", "bfloat16"],
], ids=["element1", "element2-global", "mix-kv-max", "vector-top-attention", "l2-first", "uniform", "bf16"])
def test_from_disk_equals_the_fully_loaded_result(tmp_path, story_llama_dir, calib_file, capsys, args):
    log = prune_structured(story_llama_dir, tmp_path / "disk", "on", args, calib_file, capsys)
    prune_structured(story_llama_dir, tmp_path / "full", "off", args, calib_file, capsys)
    assert "pruned from disk" in log
    assert_same_checkpoint(tmp_path / "disk", tmp_path / "full")
    assert (tmp_path / "disk" / "structure.json").exists() == ("--uniform" not in args)
    report = json.loads((tmp_path / "disk" / "sparsefast.json").read_text())
    assert report["after"]["parameters"] < report["before"]["parameters"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_sharded_deeper_models_of_other_families(tmp_path, story_llama_dir, calib_file, capsys, family):
    """Four layers, the default range (1-2): the backward passes through layer 3 (no candidate) and stops at 1;
    an untied head; shards written as save_pretrained splits them; q/k/v biases (Qwen2), OPT's tuple outputs."""
    model = tiny_model(family, vocab_size=2048, num_hidden_layers=4, tie_word_embeddings=False)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(story_llama_dir).save_pretrained(src)
    assert (src / INDEX_FILE).is_file()
    prune_structured(src, tmp_path / "disk", "on", ["--importance", "element2"], calib_file, capsys)
    prune_structured(src, tmp_path / "full", "off", ["--importance", "element2"], calib_file, capsys)
    assert_same_checkpoint(tmp_path / "disk", tmp_path / "full")


def test_layerwise_importance_is_the_whole_models_bit_for_bit(story_llama_dir):
    """The scores themselves (not only the units they select): the layer-by-layer gradients are the whole model's."""
    config = StructuralConfig(layers="0-1", importance="mix", nsamples=3, seqlen=16)
    calib = torch.randint(0, 2048, (3, 16), generator=torch.Generator().manual_seed(0))
    whole = transformers.AutoModelForCausalLM.from_pretrained(story_llama_dir).eval()
    units = plan_candidates(whole, build_graph(whole), config).units
    expected, stats = unit_importance(whole, units, config, calib)
    plan = plan_streamed(story_llama_dir)
    stream = open_streamed(plan)
    units = plan_candidates(plan.model, build_graph(plan.model), config).units
    got, streamed_stats = unit_importance(plan.model, units, config, calib, layer_stream=stream)
    assert got == expected
    assert streamed_stats["calib_loss"] == stats["calib_loss"]
    assert all(p.device.type == "meta" for p in plan.model.model.layers.parameters())  # every layer dropped again


def test_auto_streams_only_what_does_not_fit(tmp_path, story_llama_dir, calib_file, capsys, monkeypatch):
    import sparsefast.device as device

    args = ["--layers", "0-1"]
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 10**12)
    assert "pruning from disk" not in prune_structured(story_llama_dir, tmp_path / "a", "auto", args, calib_file,
                                                       capsys)
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 10**6)
    assert "pruning from disk" in prune_structured(story_llama_dir, tmp_path / "b", "auto", args, calib_file, capsys)
    assert_same_checkpoint(tmp_path / "b", tmp_path / "a")


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "channel"], "channel pruning narrows the embeddings and every layer; only the block strategy"),
    (["--strategy", "layer"], "layer pruning renumbers the decoder layers; only the block strategy prunes"),
])
def test_requests_streaming_cannot_serve_are_refused(tmp_path, story_llama_dir, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["prune-structured", str(story_llama_dir), "--from-disk", "on", "--device", "cpu", "--no-progress",
                 "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_gguf_source_is_refused_with_its_fix(tmp_path, capsys):
    code = main(["prune-structured", "smollm2", "--from-disk", "on", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "prune it with --from-disk off" in err[-1], err


def test_a_failure_mid_gradients_leaves_the_model_as_it_was(story_llama_dir, monkeypatch):
    """An error inside the layer-by-layer gradients (here: a non-finite loss) propagates, and every layer is back on
    meta without a forward stand-in, no layer parameter wants gradients, the resident ones keep their flags."""
    from sparsefast.prune.structural import importance

    config = StructuralConfig(layers="0-1", nsamples=2, seqlen=16)
    calib = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = plan_streamed(story_llama_dir)
    stream = open_streamed(plan)
    model = plan.model
    model.model.norm.weight.requires_grad_(True)
    units = plan_candidates(model, build_graph(model), config).units
    real_backward = torch.autograd.backward
    calls = []

    def failing_backward(*args, **kwargs):  # the second layer's backward fails
        calls.append(1)
        if len(calls) > len(calib):
            raise RuntimeError("injected")
        return real_backward(*args, **kwargs)

    monkeypatch.setattr(importance.torch.autograd, "backward", failing_backward)
    with pytest.raises(RuntimeError, match="injected"):
        unit_importance(model, units, config, calib, layer_stream=stream)
    for layer in model.model.layers:
        assert "forward" not in layer.__dict__
        assert all(p.device.type == "meta" and not p.requires_grad for p in layer.parameters())
    assert model.model.norm.weight.requires_grad and not model.lm_head.weight.requires_grad


def test_a_gpu_device_is_refused_before_work(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.api as api

    monkeypatch.setattr(api, "compute_device", lambda name: torch.device("cuda"))
    out = tmp_path / "out"
    code = main(["prune-structured", str(story_llama_dir), "--from-disk", "on", "--device", "cuda", "--no-progress",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "pruning from disk runs on the CPU: --device cpu, or --from-disk off" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
