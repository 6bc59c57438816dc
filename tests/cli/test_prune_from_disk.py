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

STORY = "Once upon a time there was a little fox who lived in the forest with her family. " * 40
SAVED = (SINGLE_FILE, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture()
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([STORY, STORY[::-1], STORY.upper()]))
    return path


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
    layer_bytes = sum(t.numel() * t.element_size() for n, t in load_file(str(tmp_path / "disk" / SINGLE_FILE)).items()
                      if n.startswith("model.layers."))
    passes = 2 if "owl" in args else 1  # OWL's outlier pass reads every layer once more
    assert report["weight_bytes_read"] == passes * layer_bytes


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


def test_non_directory_sources_are_refused(tmp_path, capsys):
    code = main(["prune", "smollm2", "--method", "magnitude", "--from-disk", "on", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not a local Hugging Face checkpoint directory" in err[-1], err


def test_foreign_tensors_are_refused_before_work(tmp_path, story_llama_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in story_llama_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    state = load_file(str(story_llama_dir / SINGLE_FILE))
    state["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(128)
    (src / SINGLE_FILE).unlink()
    save_file(state, str(src / SINGLE_FILE), metadata={"format": "pt"})
    code = main(["prune", str(src), "--method", "magnitude", "--from-disk", "on", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "holds 1 tensors the model does not name (e.g. model.layers.0.mlp.down_proj.weight_scale)" \
        in err[-1], err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_nan_weights_are_refused_and_nothing_is_written(poisoned_story, tmp_path, capsys, method):
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a fox. " * 200)
    out = tmp_path / "out"
    code = main(["prune", str(poisoned_story), "--method", method, "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--device", "cpu", "--out", str(out), "--from-disk", "on", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "model.layers.0.self_attn.v_proj holds NaN or inf" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
