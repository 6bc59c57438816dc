"""Fixtures shared by the CLI tests of several subcommands."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def poisoned_story(story_llama_dir, tmp_path):
    """A copy of the tiny story llama with one NaN in a prunable weight, saved as a plain HF checkpoint."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(story_llama_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[2, 7] = float("nan")
    src = tmp_path / "nan-model"
    model.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(story_llama_dir).save_pretrained(src)
    return src


STORY = "Once upon a time there was a little fox who lived in the forest with her family. " * 40


@pytest.fixture()
def calib_file(tmp_path):
    """A small calibration text file (three documents) for the commands' --calib."""
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join([STORY, STORY[::-1], STORY.upper()]))
    return path
