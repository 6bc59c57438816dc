"""`sparsefast prune --from-disk`: the decoder layers streamed from the checkpoint give the fully-loaded result byte for
byte (every method and option of the layer-sequential engine, tied and untied heads, sharded sources, bf16), the
automatic choice, and every request streaming cannot serve refused before work with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from sparsefast.cli import main
from sparsefast.models.safetensors_stream import INDEX_FILE, SINGLE_FILE
from tests.conftest import tiny_model

SAVED = (SINGLE_FILE, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def prune(src, out, mode, args, calib, capsys):
    code = main(["prune", str(src), *args, "--calib", str(calib), "--nsamples", "3", "--seqlen", "64", "--out",
                 str(out), "--from-disk", mode, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def assert_same_checkpoint(a, b):
    for name in SAVED:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "sparsefast.json").read_text()) for d in (a, b))
    assert ra["linears"].keys() == rb["linears"].keys()
    assert ra["achieved_sparsity"] == rb["achieved_sparsity"] and "from_disk" in ra and "from_disk" not in rb


@pytest.mark.parametrize("args", [
    ["--method", "wanda", "--pattern", "2:4"],
    ["--method", "sparsegpt", "--sparsity", "0.5"],
    ["--method", "ria", "--pattern", "2:4"],  # its channel reallocation permutes rows across a layer's linears
    ["--method", "wanda", "--sparsity", "0.6", "--sparsity-allocation", "owl", "--refine", "dsnot"],
    ["--method", "magnitude", "--pattern", "4:8"],
    ["--method", "sparsegpt", "--pattern", "2:4", "--dtype", "bfloat16"],
], ids=["wanda-2:4", "sparsegpt-50%", "ria-2:4", "wanda-owl-dsnot", "magnitude-4:8", "sparsegpt-bf16"])
def test_from_disk_equals_the_fully_loaded_result(tmp_path, story_llama_dir, calib_file, capsys, args):
    log = prune(story_llama_dir, tmp_path / "disk", "on", args, calib_file, capsys)
    prune(story_llama_dir, tmp_path / "full", "off", args, calib_file, capsys)
    assert_same_checkpoint(tmp_path / "disk", tmp_path / "full")
    assert "saved" in log
    report = json.loads((tmp_path / "disk" / "sparsefast.json").read_text())["from_disk"]
    layer_bytes = sum(t.numel() * t.element_size() for n, t in load_file(str(story_llama_dir / SINGLE_FILE)).items()
                      if n.startswith("model.layers."))
    passes = 2 if "owl" in args else 1  # OWL's outlier pass reads every layer once more
    assert report["bytes_read"] == passes * layer_bytes


def test_sharded_untied_source(tmp_path, story_llama_dir, calib_file, capsys):
    model = tiny_model("llama", vocab_size=2048, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=False)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="200KB")
    transformers.AutoTokenizer.from_pretrained(story_llama_dir).save_pretrained(src)
    assert (src / INDEX_FILE).is_file()
    args = ["--method", "wanda", "--pattern", "2:4"]
    prune(src, tmp_path / "disk", "on", args, calib_file, capsys)
    prune(src, tmp_path / "full", "off", args, calib_file, capsys)
    assert_same_checkpoint(tmp_path / "disk", tmp_path / "full")


def test_auto_streams_only_what_does_not_fit(tmp_path, story_llama_dir, calib_file, capsys, monkeypatch):
    import sparsefast.device as device

    args = ["--method", "wanda", "--pattern", "2:4"]
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 10**12)
    assert "pruning from disk" not in prune(story_llama_dir, tmp_path / "a", "auto", args, calib_file, capsys)
    assert "from_disk" not in json.loads((tmp_path / "a" / "sparsefast.json").read_text())
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 10**6)
    assert "pruning from disk" in prune(story_llama_dir, tmp_path / "b", "auto", args, calib_file, capsys)
    assert "from_disk" in json.loads((tmp_path / "b" / "sparsefast.json").read_text())
    assert_same_checkpoint(tmp_path / "b", tmp_path / "a")


@pytest.mark.parametrize("extra, message", [
    ([], "give --out DIR"),
    (["--eval", "wikitext2"], "--eval cannot run"),
    (["--quantize", "int8"], "--quantize rounds the LM head"),
])
def test_requests_streaming_cannot_serve_are_refused(tmp_path, story_llama_dir, capsys, extra, message):
    argv = ["prune", str(story_llama_dir), "--method", "magnitude", "--from-disk", "on", "--no-progress", *extra]
    out = tmp_path / "out"
    if extra:
        argv += ["--out", str(out)]
    else:
        argv += ["--json", str(tmp_path / "r.json")]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not out.exists() and not (tmp_path / "r.json").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("source, message", [
    ("smollm2", "a GGUF file is dequantized by transformers as a whole; prune it with --from-disk off"),
    ("someone/some-model", "a hub id: download it first"),
])
def test_other_sources_are_refused_with_their_own_fix(tmp_path, capsys, source, message):
    code = main(["prune", source, "--method", "magnitude", "--from-disk", "on", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err


def story_with(story_llama_dir, tmp_path, extra: dict[str, torch.Tensor]):
    """A copy of the story llama whose safetensors also hold `extra`."""
    src = tmp_path / "src"
    src.mkdir()
    for f in story_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = {**load_file(str(story_llama_dir / SINGLE_FILE)), **extra}
    (src / SINGLE_FILE).unlink()
    save_file(state, str(src / SINGLE_FILE), metadata={"format": "pt"})
    return src


@pytest.mark.parametrize("extra, message", [
    ({"model.layers.0.mlp.down_proj.weight_scale": torch.ones(128)},
     "this checkpoint is quantized (model.layers.0.mlp.down_proj.weight_scale); prune the checkpoint from before"),
    ({"model.layers.0.mlp.extra.weight": torch.ones(3)},
     "holds tensors the model does not name (e.g. model.layers.0.mlp.extra.weight"),
])
def test_unstreamable_checkpoints_are_refused_before_work(tmp_path, story_llama_dir, capsys, extra, message):
    src = story_with(story_llama_dir, tmp_path, extra)
    code = main(["prune", str(src), "--method", "magnitude", "--from-disk", "on", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1], err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_auto_loads_whole_what_cannot_be_streamed(tmp_path, story_llama_dir, calib_file, capsys, monkeypatch):
    import sparsefast.device as device

    src = story_with(story_llama_dir, tmp_path, {"model.layers.0.mlp.extra.weight": torch.ones(3)})
    monkeypatch.setattr(device, "available_memory_bytes", lambda: 10**6)
    log = prune(src, tmp_path / "a", "auto", ["--method", "wanda", "--pattern", "2:4"], calib_file, capsys)
    assert "not pruning from disk although the model takes" in log and "does not name" in log
    assert "from_disk" not in json.loads((tmp_path / "a" / "sparsefast.json").read_text())


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nan_weights_are_refused_before_any_file_is_written(story_llama_dir, tmp_path, capsys, method, layer,
                                                             monkeypatch):
    import sparsefast.checkpoint as checkpoint

    state = load_file(str(story_llama_dir / SINGLE_FILE))
    state[f"model.layers.{layer}.self_attn.v_proj.weight"][2, 7] = float("nan")
    src = story_with(story_llama_dir, tmp_path, state)
    monkeypatch.setattr(checkpoint, "atomic_output_dir", lambda *a, **k: pytest.fail("a partial dir was made"))
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a fox. " * 200)
    out = tmp_path / "out"
    code = main(["prune", str(src), "--method", method, "--calib", str(calib), "--nsamples", "2", "--seqlen", "32",
                 "--device", "cpu", "--out", str(out), "--from-disk", "on", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"model.layers.{layer}.self_attn.v_proj holds NaN or inf" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt_neox"])
def test_every_family_streams_or_is_refused_clearly(tmp_path, story_llama_dir, calib_file, capsys, family):
    model = tiny_model(family, vocab_size=2048)
    src = tmp_path / "src"
    model.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(story_llama_dir, trust_remote_code=False).save_pretrained(src)
    args = ["--method", "wanda", "--pattern", "2:4"]
    if family == "gpt_neox":  # transformers 5 renames its stored embed_out to lm_head at load
        code = main(["prune", str(src), *args, "--out", str(tmp_path / "disk"), "--from-disk", "on"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "holds tensors the model does not name (e.g. embed_out.weight" in err[-1], err
        return
    prune(src, tmp_path / "disk", "on", args, calib_file, capsys)
    prune(src, tmp_path / "full", "off", args, calib_file, capsys)
    assert_same_checkpoint(tmp_path / "disk", tmp_path / "full")
