"""`sparsefast eval` on the story llama: JSON output, and every bad input rejected before the model is loaded."""

from __future__ import annotations

import argparse
import json

import pytest

from sparsefast.cli import eval as eval_cli
from sparsefast.cli import main

STORY = "Once upon a time, there was a little girl named Lily. She liked to play outside in the sun.\n"


def run_eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparsefast")
    eval_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEFAST_DATA", raising=False)
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = Lily = \n \n" + STORY * 12)
    (root / "ptb").mkdir()
    (root / "ptb" / "ptb.test.txt").write_text(" the little girl played in the sun \n" * 40)
    return root


@pytest.fixture
def no_model_load(monkeypatch):
    """Make any model load fail loudly: validation errors must come first."""
    import sparsefast.models

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before validation finished")

    monkeypatch.setattr(sparsefast.models, "load_model", boom)


def test_eval_writes_json(story_llama_dir, data_dir, tmp_path, capsys):
    from sparsefast.data import get_eval_tokens
    from sparsefast.eval.perplexity import perplexity
    from sparsefast.models import load_model

    out = tmp_path / "res.json"
    rc = run_eval([str(story_llama_dir), "--ppl", "wikitext2,ptb", "--seqlen", "64", "--data-dir", str(data_dir),
                   "--device", "cpu", "--json", str(out), "--no-progress", "--batch-size", "2"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model_type"] == "llama" and result["parameters"] == 656_000 and result["dtype"] == "float32"
    ppl = result["perplexity"]
    assert (ppl["protocol"], ppl["seqlen"], ppl.get("max_windows")) == ("gptq", 64, None)
    assert {"wikitext2", "ptb"} <= set(ppl) and "c4" not in ppl
    model, tokenizer = load_model(str(story_llama_dir))
    for name in ("wikitext2", "ptb"):
        direct = perplexity(model, get_eval_tokens(name, tokenizer, data_dir=data_dir), 64, progress=False)
        assert ppl[name] == pytest.approx(direct, rel=1e-5)
    assert "wikitext2  ppl" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".res.json")] == []  # no temp file left


def test_llm_pruner_protocol_default_seqlen(story_llama_dir, data_dir, tmp_path):
    (data_dir / "ptb" / "ptb.valid.txt").write_text(" the dog ran to the park \n" * 40)
    out = tmp_path / "r.json"
    assert run_eval([str(story_llama_dir), "--ppl", "ptb", "--protocol", "llm-pruner", "--data-dir", str(data_dir),
                     "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["perplexity"]["seqlen"] == 128


@pytest.mark.parametrize("argv, message", [
    (["--ppl", "wikitext2,wikitext3"], "unknown perplexity dataset 'wikitext3'"),
    (["--ppl", "c4", "--protocol", "llm-pruner"], "llm-pruner protocol defines wikitext2 and ptb only"),
    (["--ppl", "wikitext2", "--seqlen", "1"], "--seqlen must be ≥ 2"),
    (["--ppl", "wikitext2", "--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--ppl", "wikitext2,wikitext2"], "lists a dataset twice"),
    (["--ppl", "none"], "nothing to evaluate"),
    (["--ppl", "wikitext2", "--limit", "5"], "--limit applies to zero-shot tasks only"),
    (["--ppl", "", "--tasks", "nosuchtask"], "unknown zero-shot task"),
    (["--ppl", "", "--tasks", "piqa", "--server", "http://127.0.0.1:9", "--int8-activations"],
     "--int8-activations is the served model's setting"),
])
def test_bad_arguments_fail_before_loading(story_llama_dir, data_dir, no_model_load, argv, message):
    with pytest.raises(ValueError, match=message):
        run_eval([str(story_llama_dir), "--data-dir", str(data_dir), *argv])


def test_missing_data_and_output_dir_fail_before_loading(story_llama_dir, tmp_path, no_model_load, monkeypatch):
    monkeypatch.delenv("SPARSEFAST_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="ptb/ptb.test.txt not found"):
        run_eval([str(story_llama_dir), "--ppl", "ptb", "--data-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="does not exist"):
        run_eval([str(story_llama_dir), "--json", str(tmp_path / "no" / "such" / "dir.json")])
    with pytest.raises(FileNotFoundError, match="not found"):
        run_eval([str(tmp_path / "missing-model")])


def test_cuda_without_cuda_fails_before_loading(story_llama_dir, no_model_load):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run_eval([str(story_llama_dir), "--device", "cuda"])


def test_seqlen_beyond_context(story_llama_dir, data_dir):
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        run_eval([str(story_llama_dir), "--seqlen", "1024", "--data-dir", str(data_dir)])


def test_zero_shot_alone_runs_on_a_short_context_model(story_llama_dir, tmp_path):
    """Issue 20, case 10: `eval TINY --tasks piqa` asks for no perplexity, so no --seqlen default (2048 > the story
    llama's 512) is checked and none runs; with --ppl the default window is capped by the context."""
    out = tmp_path / "zs.json"
    assert run_eval([str(story_llama_dir), "--tasks", "piqa", "--limit", "2", "--device", "cpu", "--no-progress",
                     "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "perplexity" not in result and result["zeroshot"]["tasks"]["piqa"]["acc"] is not None


def test_default_window_fits_the_model(story_llama_dir, shared_dir, tmp_path):
    out = tmp_path / "ppl.json"
    assert run_eval([str(story_llama_dir), "--data-dir", str(shared_dir / "data"), "--max-windows", "1",
                     "--device", "cpu", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"]["seqlen"] == 512  # min(2048, the model's context)


def test_json_is_not_replaced_without_overwrite(story_llama_dir, data_dir, tmp_path, no_model_load):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    with pytest.raises(ValueError, match="notes.txt exists; choose another file name or pass --overwrite"):
        run_eval([str(story_llama_dir), "--data-dir", str(data_dir), "--json", str(notes)])
    assert notes.read_text() == "the user's notes"


def test_registered_in_main_parser():
    """`sparsefast eval` is reachable from the top-level command (when every subcommand module exists)."""
    from sparsefast import cli

    for name in cli.SUBCOMMANDS:
        pytest.importorskip(f"sparsefast.cli.{name}")
    args = cli.build_parser().parse_args(["eval", "smollm2", "--ppl", "wikitext2"])
    assert args.func is eval_cli.run and args.model == "smollm2"


def run_main(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith(f"sparsefast {command}: error:"), err
    return lines[0]


def test_broken_inputs_are_one_line(tmp_path, story_llama_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in story_llama_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    code, _, err = run_main(["eval", str(broken), "--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "1",
                        "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and "model.safetensors: not a complete safetensors file" in one_error_line(err, "eval")


def test_missing_data_dir_is_an_error_before_loading(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    nowhere = tmp_path / "nowhere"
    code, _, err = run_main(["eval", str(story_llama_dir), "--ppl", "wikitext2", "--device", "cpu", "--data-dir",
                        str(nowhere)], capsys)
    assert code == 2 and f"--data-dir {nowhere} does not exist" in one_error_line(err, "eval")


def test_int8_activations_need_an_int8_checkpoint(story_llama_dir, data_dir):
    with pytest.raises(ValueError, match="need an int8-quantized model"):
        run_eval([str(story_llama_dir), "--data-dir", str(data_dir), "--ppl", "wikitext2", "--int8-activations",
                  "--max-windows", "1", "--no-progress"])
