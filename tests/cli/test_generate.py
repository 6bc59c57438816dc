"""`sparsefast generate`: streams the engine's text to stdout, the speed line to stderr; bad input is one line, exit 2,
checked before the model is loaded."""

from __future__ import annotations

import pytest
import torch

from sparsefast.cli import main


def test_generate_streams_the_greedy_completion(story_llama_dir, capsys):
    from sparsefast.api import load

    model, tok = load(story_llama_dir)
    ids = tok("Once upon a time")["input_ids"]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tok.decode(ref[0, len(ids):], skip_special_tokens=True)
    assert main(["generate", str(story_llama_dir), "--prompt", "Once upon a time", "--max-tokens", "12",
                 "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "12 tokens in" in err and "tokens/s" in err and "finish: length" in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "hi", "--max-tokens", "0"], "max_tokens: must be an integer >= 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature:"),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--sparse", "off", "--int8-activations"], "int8 activations run in the CPU modules of sparse"),
])
def test_bad_input_is_one_line_exit_2_before_loading(argv, message, capsys):
    # the model path does not exist: the request checks must fire first
    assert main(["generate", "/nonexistent/model", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("sparsefast generate: error:")


def test_chat_without_template_and_missing_model(story_llama_dir, capsys):
    assert main(["generate", str(story_llama_dir), "--prompt", "hi", "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert main(["generate", "/nonexistent/model", "--prompt", "hi"]) == 2
    assert "not found" in capsys.readouterr().err
