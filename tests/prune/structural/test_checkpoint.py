"""Save / reload without pickle: safetensors + structure.json; outputs equal, generate() works."""

from __future__ import annotations

import json

import pytest
import torch

from sparsefast.prune.structural import StructuralConfig, load_structural, prune_structured, save_structural
from tests.conftest import tiny_model

IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,cfg,overrides", [
    ("llama", StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), {}),
    ("llama", StructuralConfig(ratio=0.25, importance="l2", strategy="channel"), {"tie_word_embeddings": True}),
    ("qwen2", StructuralConfig(ratio=0.5, importance="random", layers="0-2", strategy="layer"),
     {"num_hidden_layers": 3}),
    ("opt", StructuralConfig(ratio=0.5, importance="random", layers="1-1"), {}),
    ("gpt_neox", StructuralConfig(ratio=0.25, importance="l2", layers="0-1", gqa="kv_groups"), {}),
])
def test_save_reload_equal_outputs(tmp_path, family, cfg, overrides):
    model = tiny_model(family, **overrides).float()
    if overrides.get("tie_word_embeddings"):
        model.tie_weights()
    report = prune_structured(model, None, cfg, None)
    out = save_structural(model, tmp_path / "ckpt", report=report)
    files = sorted(p.name for p in out.iterdir())
    assert "structure.json" in files and "model.safetensors" in files and "sparsefast.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    structure = json.loads((out / "structure.json").read_text())
    assert structure["layers"] == report["layers"]
    saved = json.loads((out / "sparsefast.json").read_text())
    assert saved["after"]["parameters"] == report["after"]["parameters"]
    loaded, tok = load_structural(out)
    assert tok is None
    assert sum(p.numel() for p in loaded.parameters()) == report["after"]["parameters"]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    a = model.generate(IDS, max_new_tokens=4, do_sample=False)
    b = loaded.generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b) and b.shape == (1, 14)


def test_reload_in_bfloat16_and_through_load_model(tmp_path, story_llama_dir):
    from transformers import AutoTokenizer

    model = tiny_model("mistral").float()
    prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), None)
    # load_model needs a tokenizer in the checkpoint (any tokenizer: only the model's outputs are compared)
    out = save_structural(model, tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(story_llama_dir))
    loaded, _ = load_structural(out, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.q_proj.out_features == 32
    from sparsefast.models import load_model

    via_loader, _ = load_model(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, via_loader(IDS).logits)


def test_save_refuses_to_clobber_and_load_checks_files(tmp_path):
    model = tiny_model("llama").float()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite"):
        save_structural(model, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="not a sparsefast output"):  # --overwrite never replaces foreign files
        save_structural(model, tmp_path / "full", overwrite=True)
    (tmp_path / "full" / "sparsefast.json").write_text("{}")  # an earlier output of ours is replaced
    save_structural(model, tmp_path / "full", overwrite=True)
    assert not (tmp_path / "full" / "keep.txt").exists()
    with pytest.raises(FileNotFoundError, match="structure.json"):
        load_structural(tmp_path)
    (tmp_path / "full" / "structure.json").write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(ValueError, match="format"):
        load_structural(tmp_path / "full")
