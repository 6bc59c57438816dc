"""Hostile or broken inputs to the loaders: no remote code ever runs, no pickle is executed, and every broken file
(truncated safetensors, pickle .bin, bad gzip, binary text, malformed structure.json, missing tokenizer) is one
ValueError / FileNotFoundError naming the file, raised before anything is built from it."""

from __future__ import annotations

import builtins
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers

from sparsefast.data import read_documents
from sparsefast.models import load_model
from sparsefast.prune.structural import StructuralConfig, load_structural, prune_structured, save_structural
from tests.conftest import tiny_model

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

    root = Path(__file__).resolve().parents[1]
    missing = []
    for path in sorted([*(root / "sparsefast").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")):
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


def test_bad_gzip_and_binary_calibration_files_name_the_file(tmp_path):
    fake = tmp_path / "c4.json.gz"
    fake.write_text('{"text": "plain text, not gzip"}\n')
    with pytest.raises(ValueError, match=r"c4\.json\.gz: not a valid gzip file"):
        read_documents(fake)
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"calib\.txt: not UTF-8 text"):
        read_documents(binary)


def test_missing_data_dir_is_an_error(tmp_path):
    from sparsefast.data import find_data_file

    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere does not exist"):
        find_data_file("wikitext-2-raw/wiki.test.raw", tmp_path / "nowhere")


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
