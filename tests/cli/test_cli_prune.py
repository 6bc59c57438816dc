"""`sparsefast prune` end to end: a real tiny llama, the embedded GGUF default, and every bad input (exit code 2,
a one-line error, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from sparsefast.cli import main

STORY = "Once upon a time there was a little fox who lived in the forest with her family. " * 40


@pytest.fixture()
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([STORY, STORY[::-1], STORY.upper()]))
    return path


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_story_llama_and_reload(tmp_path, story_llama_dir, calib_file, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["prune", str(story_llama_dir), "--method", "sparsegpt", "--pattern", "2:4", "--calib",
                             str(calib_file), "--nsamples", "3", "--seqlen", "64", "--device", "cpu", "--out",
                             str(out), "--json", str(tmp_path / "report.json"), "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((out / "sparsefast.json").read_text())
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == "sparsegpt" and report["pattern"] == "2:4" and report["model"] == str(story_llama_dir)
    assert report["calibration"]["nsamples"] == 3 and report["calibration"]["seqlen"] == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert ((lin.weight != 0).view(lin.weight.shape[0], -1, 4).sum(-1) <= 2).all()
    assert "achieved sparsity 0.5000" in stdout
    assert transformers.utils.logging.is_progress_bar_enabled()  # --no-progress is undone for the rest of the process


def test_gguf_default_model(tmp_path, capsys):
    from sparsefast.models import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "smol"
    code, _, err = run(["prune", "smollm2", "--method", "wanda", "--pattern", "4:8", "--calib", "c4",
                        "--nsamples", "1", "--seqlen", "16", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[3].mlp.gate_proj.weight
    assert ((w != 0).view(w.shape[0], -1, 8).sum(-1) <= 4).all() and (w == 0).float().mean() == 0.5
    emb = model.get_input_embeddings().weight  # never pruned (Q4_1 dequantized: it has zeros of its own)
    assert ((emb != 0).view(emb.shape[0], -1, 8).sum(-1) > 4).any()


def bad_cases(tmp_path, story, calib_file):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    base = [story, "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "32"]
    cases = [
        (base + ["--sparsity", "1.0"], "sparsity must be a number in [0, 1)"),
        (base + ["--sparsity", "-0.2"], "sparsity must be"),
        (base + ["--pattern", "4:4"], "0 < N < M"),
        (base + ["--pattern", "2:5"], "M=5 must divide"),
        (base + ["--pattern", "dense"], "unknown pattern"),
        (base + ["--method", "obs"], "unknown method"),
        ([str(bert), "--nsamples", "2", "--seqlen", "32"], "unsupported architecture"),
        (base + ["--nsamples", "0"], "nsamples must be an integer >= 1"),
        (base[:-1] + ["600"], "exceeds the model's context of 512"),
        ([story, "--calib", str(short), "--nsamples", "1", "--seqlen", "32"], "calibration text too short"),
        ([story, "--calib", str(tmp_path / "missing.txt"), "--seqlen", "32"], "missing.txt"),
        ([str(tmp_path / "nomodel")], "nomodel"),
        (base + ["--eval", "imagenet"], "unknown perplexity dataset"),
    ]
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], "CUDA is not available"))
    return cases, full


def test_bad_inputs_write_nothing(tmp_path, story_llama_dir, calib_file, capsys):
    cases, full = bad_cases(tmp_path, str(story_llama_dir), calib_file)
    for argv, msg in cases:
        out = tmp_path / "never"
        code, _, err = run(["prune", *argv, "--out", str(out), "--no-progress"], capsys)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith("sparsefast prune: error:") and msg in last, (argv, err)
        assert not out.exists(), argv
    code, _, err = run(["prune", str(story_llama_dir), "--out", str(full)], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    code, _, err = run(["prune", str(story_llama_dir)], capsys)
    assert code == 2 and "nothing to do" in err


def test_overwrite(tmp_path, story_llama_dir, calib_file, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.bin").write_text("x")
    argv = ["prune", str(story_llama_dir), "--method", "magnitude", "--sparsity", "0.25", "--out", str(out),
            "--overwrite", "--no-progress"]
    code, _, err = run(argv, capsys)  # not a sparsefast output: --overwrite does not touch it
    assert code == 2 and "not a sparsefast output" in err and (out / "old.bin").read_text() == "x"
    (out / "sparsefast.json").write_text("{}")  # an earlier result of ours is replaced
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert not (out / "old.bin").exists() and json.loads((out / "sparsefast.json").read_text())["calibration"] is None
