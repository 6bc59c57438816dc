"""Non-finite weights are refused before any work, naming the first bad linear: every mask-pruning method, the
structural pruner and LoRA recovery, through the API and the CLI; nothing is modified or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sparsefast
from sparsefast.cli import main
from sparsefast.config import make_config
from sparsefast.models import check_finite_weights
from tests.conftest import tiny_model

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
ALPACA = Path(__file__).resolve().parent / "fixtures" / "recover" / "alpaca_small.jsonl"


def poisoned(family: str = "llama", value: float = float("nan")):
    model = tiny_model(family).float()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    return model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n], ) or (p.isnan() == before[n].isnan()).all() and
               torch.equal(p.nan_to_num(), before[n].nan_to_num()) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_every_method_refuses_non_finite_weights_before_work(method, value):
    model = poisoned(value=value)
    before = snapshot(model)
    config = make_config(method, sparsity=0.5, nsamples=2, seqlen=16)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj holds NaN or inf"):
        sparsefast.prune(model, config, IDS, progress=False)
    assert unchanged(model, before)


def test_first_bad_module_is_named_and_clean_models_pass():
    model = poisoned()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj "):
        check_finite_weights(model)
    check_finite_weights(tiny_model("opt"))
    opt = tiny_model("opt")
    with torch.no_grad():
        opt.model.decoder.layers[0].fc1.weight[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"model\.decoder\.layers\.0\.fc1 "):
        check_finite_weights(opt)


def test_structural_pruner_refuses_non_finite_weights():
    from sparsefast.prune.structural import StructuralConfig, prune_structured

    model = poisoned()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"down_proj holds NaN or inf"):
        prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), None)
    assert unchanged(model, before) and model.model.layers[1].mlp.down_proj.weight.shape == (64, 128)


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


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_cli_prune_refuses_nan_weights_and_writes_nothing(poisoned_story, tmp_path, capsys, method):
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a fox. " * 200)
    out = tmp_path / "out"
    code = main(["prune", str(poisoned_story), "--method", method, "--calib", str(calib), "--nsamples", "2",
                 "--seqlen", "32", "--device", "cpu", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "model.layers.0.self_attn.v_proj holds NaN or inf" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_recover_refuses_nan_weights_before_training(poisoned_story, tmp_path, capsys):
    out = tmp_path / "rec"
    code = main(["recover", str(poisoned_story), "--data", str(ALPACA), "--out", str(out), "--max-samples", "2",
                 "--epochs", "1", "--dtype", "fp32", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "model.layers.0.self_attn.v_proj holds NaN or inf" in err and "loss" not in err, err
    assert not out.exists()
