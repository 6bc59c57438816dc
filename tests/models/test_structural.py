"""The structural checkpoint format (sparsefast.models.structural, read back by load_structural / load_model): save
and reload without pickle (safetensors + structure.json), equal outputs, generate() works; a malformed structure.json
or a missing tokenizer is one error naming the file, raised before anything is built from it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from sparsefast.models import load_model, load_structural, save_structural
from sparsefast.prune.structural import StructuralConfig, prune_structured
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
    (tmp_path / "full" / "sparsefast.json").write_text("{}")  # a report named sparsefast.json proves nothing
    with pytest.raises(ValueError, match="no record of the files sparsefast wrote"):
        save_structural(model, tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    save_structural(model, tmp_path / "ours", overwrite=True)
    save_structural(model, tmp_path / "ours", overwrite=True)  # an output whose record lists everything is replaced
    assert (tmp_path / "ours" / "structure.json").is_file()
    with pytest.raises(FileNotFoundError, match="structure.json"):
        load_structural(tmp_path)
    (tmp_path / "ours" / "structure.json").write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(ValueError, match="format"):
        load_structural(tmp_path / "ours")


@pytest.fixture(scope="module")
def structural_ckpt(tmp_path_factory, story_llama_dir):
    model = tiny_model("llama").float()
    prune_structured(model, None, StructuralConfig(ratio=0.5, importance="l2", layers="0-1"), None)
    tok = transformers.AutoTokenizer.from_pretrained(story_llama_dir)
    return save_structural(model, tmp_path_factory.mktemp("s") / "ckpt", tokenizer=tok)


def edited(structural_ckpt, tmp_path, edit):
    d = tmp_path / "edited"
    shutil.copytree(structural_ckpt, d)
    structure = json.loads((d / "structure.json").read_text())
    result = edit(structure)
    (d / "structure.json").write_text(result if isinstance(result, str) else json.dumps(structure))
    return d


def _set(path, value):
    def edit(s):
        node = s
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


Q = "model.layers.0.self_attn.q_proj"
ATTN = "model.layers.0.self_attn"


@pytest.mark.parametrize("edit,message", [
    (lambda s: "{not json", "not valid JSON"),
    (lambda s: s.pop("modules"), r"missing keys \['modules'\]"),
    (lambda s: s.update(run="os.system"), r"unknown keys \['run'\]"),
    (lambda s: s["modules"].update({"model.layers.9.mlp": {"kind": "norm", "size": 4}}),
     "'model.layers.9.mlp' does not exist"),
    (_set(["modules", Q, "shape"], [10 ** 9, 64]), "asks for size"),
    (_set(["modules", Q, "shape"], [0, 64]), "asks for size"),
    (_set(["modules", Q, "kind"], "embedding"), "is a linear"),
    (_set(["attributes", ATTN], {"training": True}), r"self_attn\.training may not be set"),
    (_set(["attributes", ATTN], {"forward": 1}), "may not be set"),
    (_set(["attributes", ATTN, "num_key_value_groups"], -2), "must be a positive int"),
    (_set(["attributes", ATTN, "num_key_value_groups"], 10 ** 6), "must be a positive int <= 4"),
    (_set(["attributes", ATTN, "num_key_value_groups"], 1.5), "must be a positive int"),
])
def test_malformed_structure_json_is_refused(structural_ckpt, tmp_path, edit, message):
    d = edited(structural_ckpt, tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_model(str(d))
    assert "structure.json" in str(info.value)


def test_structural_checkpoint_without_tokenizer(structural_ckpt, tmp_path):
    d = tmp_path / "notok"
    shutil.copytree(structural_ckpt, d)
    for f in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.*save_pretrained"):
        load_model(str(d))
    model, tok = load_structural(d)  # the low-level loader still returns the model alone
    assert tok is None and model.model.layers[0].self_attn.q_proj.out_features == 32
