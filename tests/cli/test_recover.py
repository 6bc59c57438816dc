"""`sparsefast recover`: a 2:4 checkpoint keeps its zeros and its report, a NaN loss or non-finite weights stop the
run before anything is written, a structural checkpoint is saved back structurally; the parser's defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsefast.cli.recover as recover_cli
from sparsefast.recover import RecoverConfig
from tests.recover.helpers import ALPACA, load_story, prune_24


@pytest.fixture()
def story(story_llama_dir):
    return load_story(story_llama_dir)


def _save_pruned(model, tok, path: Path, report: dict) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "sparsefast.json").write_text(json.dumps(report))


@pytest.fixture()
def main(monkeypatch):
    """`sparsefast` with only the recover subcommand registered (the real main: argument parsing, error lines)."""
    import sparsefast.cli as cli

    monkeypatch.setattr(cli, "SUBCOMMANDS", ("recover",))
    return cli.main


def test_cli_recover_keeps_24_and_report(story, tmp_path, capsys, main):

    model, tok = story
    masks = prune_24(model, RecoverConfig().target_modules)
    src = tmp_path / "pruned"
    _save_pruned(model, tok, src, {"method": "wanda", "pattern": "2:4"})
    out = tmp_path / "recovered"
    argv = ["recover", str(src), "--data", str(ALPACA), "--out", str(out), "--max-samples", "6", "--epochs", "1",
            "--batch-size", "3", "--grad-accum", "1", "--lr", "5e-3", "--dtype", "fp32", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["optimizer_steps"] == 2
    report = json.loads((out / "sparsefast.json").read_text())
    assert report["method"] == "wanda" and report["recovery"]["records"] == 6
    assert report["recovery"]["config"]["lora_r"] == 8 and report["recovery"]["masked_linears"] == 14
    weights = load_file(str(out / "model.safetensors"))
    for name, zero in masks.items():
        assert torch.equal(weights[name + ".weight"] == 0, zero), name
    assert not list(tmp_path.glob(".recovered*"))  # no temp dirs left behind
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err  # refused before any work


def test_cli_nan_weights_stop_without_writing(story, tmp_path, capsys, main):

    model, tok = story
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    src = tmp_path / "broken"
    _save_pruned(model, tok, src, {})
    out = tmp_path / "out"
    argv = ["recover", str(src), "--data", str(ALPACA), "--out", str(out), "--max-samples", "4", "--epochs", "1",
            "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "loss became nan" in err and "nothing was saved" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_structural_checkpoint_recovers_and_saves_structurally(story, tmp_path, main):
    from sparsefast.models import load_model, save_structural

    model, tok = story
    mlp = model.model.layers[0].mlp  # physically drop 128 of the 384 MLP channels of layer 0
    keep = torch.arange(0, 384, 3).tolist() + torch.arange(1, 384, 3).tolist()
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(128, len(keep), bias=False)
            new.weight.copy_(old.weight[keep])
            setattr(mlp, name, new)
        down = torch.nn.Linear(len(keep), 128, bias=False)
        down.weight.copy_(mlp.down_proj.weight[:, keep])
        mlp.down_proj = down
    src, out = tmp_path / "sliced", tmp_path / "recovered"
    save_structural(model, src, tokenizer=tok, report={"method": "llm-pruner"})
    argv = ["recover", str(src), "--data", str(ALPACA), "--out", str(out), "--max-samples", "4", "--epochs", "1",
            "--batch-size", "4", "--grad-accum", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert (out / "structure.json").is_file()
    assert json.loads((out / "sparsefast.json").read_text())["method"] == "llm-pruner"
    loaded, _ = load_model(str(out))
    assert loaded.model.layers[0].mlp.up_proj.weight.shape == (256, 128)
    assert loaded.model.layers[1].mlp.up_proj.weight.shape == (384, 128)
    weights = load_file(str(out / "model.safetensors"))
    assert not torch.equal(weights["model.layers.0.mlp.down_proj.weight"], down.weight)


def test_nan_weights_are_refused_before_training(poisoned_story, tmp_path, capsys, main):
    out = tmp_path / "rec"
    code = main(["recover", str(poisoned_story), "--data", str(ALPACA), "--out", str(out), "--max-samples", "2",
                 "--epochs", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "model.layers.0.self_attn.v_proj holds NaN or inf" in err and "loss" not in err, err
    assert not out.exists()


def test_flags_left_out_give_the_config_defaults(tmp_path):
    from sparsefast.cli import build_parser

    args = build_parser().parse_args(["recover", "m", "--out", str(tmp_path), "--dtype", RecoverConfig.dtype])
    assert recover_cli.config_from_args(args) == RecoverConfig()


def test_json_is_not_replaced_without_overwrite(story_llama_dir, tmp_path, capsys, main, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --json was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    code = main(["recover", str(story_llama_dir), "--data", str(ALPACA), "--out", str(tmp_path / "o"), "--json",
                 str(notes), "--dtype", "fp32", "--device", "cpu"])
    assert code == 2 and "notes.txt exists; choose another file name or pass --overwrite" in capsys.readouterr().err
    assert notes.read_text() == "the user's notes" and not (tmp_path / "o").exists()
