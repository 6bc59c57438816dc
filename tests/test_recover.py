"""LoRA recovery: data validation, response-only labels, loss goes down, NaN stops, zeros (2:4) survive, CLI save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsefast.recover import (
    NonFiniteLossError,
    RecoverConfig,
    alpaca_prompt,
    collate,
    load_recovery_data,
    lora_recover,
    target_linears,
    tokenize_recovery_data,
)

FIX = Path(__file__).resolve().parent / "fixtures" / "recover"
ALPACA = FIX / "alpaca_small.jsonl"


@pytest.fixture()
def story(story_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(story_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(story_llama_dir)


def _batch_loss(model, samples, pad_id) -> float:
    b = collate(samples, pad_id)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             b["labels"][:, 1:].reshape(-1), ignore_index=-100).item()


def _prune_24(model, targets) -> dict[str, torch.Tensor]:
    """Magnitude 2:4 along the input dimension of every target linear; returns the zero masks."""
    masks = {}
    with torch.no_grad():
        for name, lin in target_linears(model, targets).items():
            w = lin.weight.view(lin.weight.shape[0], -1, 4)
            drop = w.abs().argsort(-1)[..., :2]
            w.scatter_(-1, drop, 0.0)
            masks[name] = lin.weight == 0
    return masks


def test_alpaca_template_and_response_only_labels(story):
    _, tok = story
    data = load_recovery_data(str(ALPACA))
    assert data.kind == "alpaca" and len(data.records) == 8 and data.records[6]["input"] == ""
    samples, dropped = tokenize_recovery_data(data, tok, cutoff_len=256)
    assert dropped == 0 and len(samples) == 8
    rec, s = data.records[1], samples[1]
    prompt = tok(alpaca_prompt(rec["instruction"], rec["input"]))["input_ids"]
    assert "### Input:\n" + rec["input"] in alpaca_prompt(rec["instruction"], rec["input"])
    assert s["labels"][: len(prompt)] == [-100] * len(prompt)  # no loss on the prompt
    assert s["labels"][len(prompt):] == s["input_ids"][len(prompt):] == (
        tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    short, dropped = tokenize_recovery_data(data, tok, cutoff_len=len(prompt) + 3)
    assert max(len(x["input_ids"]) for x in short) <= len(prompt) + 3
    text = load_recovery_data(str(FIX / "plain.txt"))
    windows, _ = tokenize_recovery_data(text, tok, cutoff_len=16)
    assert text.kind == "text" and all(w["labels"] == w["input_ids"] and len(w["input_ids"]) <= 16 for w in windows)


@pytest.mark.parametrize("name,content,match", [
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
     r"a.jsonl:3: field 'output' is missing"),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": "y"\n',
     r"a.jsonl:2: not valid JSON"),
    ("a.json", '[{"instruction": "x", "output": "y"}, {"instruction": "x", "input": 3, "output": "y"}]',
     r"record 1: field 'input' must be a string"),
    ("a.json", '[{"instruction": "  ", "output": "y"}]', r"record 0: field 'instruction' is empty"),
    ("a.json", '{"instruction": "x", "output": "y"}', "expected a JSON array"),
    ("a.json", "", "no records"),
    ("a.jsonl", "\n\n", "no records"),
    ("a.jsonl", '{"instruction": "x", "output": ""}\n{"instruction": "y", "output": " "}\n',
     r"every record has an empty 'output' field \(first: .*a.jsonl:1\)"),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n[1, 2]\n', r"a.jsonl:2: expected a JSON object"),
    ("a.jsonl", '{"text": "hello"}\n{"text": ""}\n', r"a.jsonl:2: field 'text' is empty"),
    ("a.csv", "instruction,output\n", "unsupported data file type"),
])
def test_bad_recovery_data(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_recovery_data(str(path))


def test_empty_outputs_are_skipped_and_counted(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "x", "output": "y"}, {"instruction": "z", "input": "w", "output": ""}]')
    data = load_recovery_data(str(path))
    assert [r["instruction"] for r in data.records] == ["x"] and data.skipped_empty_output == [f"{path} record 1"]


def test_missing_data_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_recovery_data(str(tmp_path / "nope.json"))
    for bad in (dict(dtype="fp16"), dict(lora_r=0), dict(lr=float("nan")), dict(lora_dropout=1.0),
                dict(target_modules=())):
        with pytest.raises(ValueError):
            RecoverConfig(**bad).validate()


def test_recovery_lowers_training_loss(story):
    model, tok = story
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    before = _batch_loss(model, samples, tok.pad_token_id)
    cfg = RecoverConfig(epochs=6, lr=3e-3, batch_size=4, grad_accum=1, lora_dropout=0.0, warmup_ratio=0.0)
    model, stats = lora_recover(model, tok, samples, cfg, progress=False)
    after = _batch_loss(model, samples, tok.pad_token_id)
    assert after < before - 0.1, (before, after)
    assert stats["optimizer_steps"] == 12 and stats["last_loss"] < stats["first_loss"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: no adapter modules left
    assert type(model).__name__ == "LlamaForCausalLM"


def test_nan_loss_stops_with_clear_error(story):
    model, tok = story
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    calls = []

    def poison(module, args, output):  # the 3rd forward goes NaN, as an fp16 overflow would
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    model.model.layers[1].mlp.down_proj.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at optimizer step 3/4 .*nothing was saved"):
        lora_recover(model, tok, samples, RecoverConfig(batch_size=4, grad_accum=1), progress=False)


@pytest.mark.parametrize("dtype,checkpointing", [("fp32", False), ("bf16", True)])
def test_24_pattern_survives_recovery_exactly(story, dtype, checkpointing):
    model, tok = story
    cfg = RecoverConfig(epochs=1, lr=5e-3, batch_size=4, grad_accum=1, dtype=dtype,
                        gradient_checkpointing=checkpointing, warmup_ratio=0.0)
    masks = _prune_24(model, cfg.target_modules)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    samples, _ = tokenize_recovery_data(load_recovery_data(str(ALPACA)), tok, cutoff_len=128)
    model, stats = lora_recover(model, tok, samples, cfg, progress=False)
    assert stats["masked_linears"] == len(masks) == 14 and stats["masked_weights_refilled_then_zeroed"] > 0
    for name, zero in masks.items():
        w = model.get_submodule(name).weight
        assert w.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        assert torch.equal(w == 0, zero), name  # exactly the same zeros: 2 of every 4
        assert not torch.allclose(w.float(), before[name], atol=1e-6), name  # the LoRA update was merged
    assert all(torch.isfinite(p).all() for p in model.parameters())


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
    masks = _prune_24(model, RecoverConfig().target_modules)
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
    from sparsefast.models import load_model
    from sparsefast.prune.structural.checkpoint import save_structural

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


def test_shared_alpaca_file_loads(shared_dir):
    data = load_recovery_data("alpaca", data_dir=str(shared_dir / "data"))
    assert data.kind == "alpaca" and len(data.records) == 1996 and len(data.skipped_empty_output) == 4
    assert data.records[0]["instruction"] == "Give three tips for staying healthy."
    assert len(load_recovery_data("alpaca", data_dir=str(shared_dir / "data"), max_samples=5).records) == 5
