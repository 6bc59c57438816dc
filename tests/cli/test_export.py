"""`sparsefast export`: end to end on the story llama (both targets), bad input refused before loading, and a
parser that imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf

from sparsefast.cli import main


def test_export_gguf_and_vllm(tmp_path, story_llama_dir, capsys):
    out = tmp_path / "story.gguf"
    assert main(["export", str(story_llama_dir), "--to", "gguf", "--out", str(out), "--outtype", "q8_0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bytes"] == out.stat().st_size and printed["outtype"] == "q8_0"
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", str(story_llama_dir), "--to", "gguf", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(story_llama_dir), "--to", "vllm", "--out", str(tmp_path / "v")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["architecture"] == "LlamaForCausalLM"
    assert (tmp_path / "v" / "config.json").is_file()


def test_export_vllm_sparse(tmp_path, story_llama_dir, capsys):
    """A magnitude 2:4 checkpoint: every vLLM layer packed 2:4 (--no-calibrate: no timing); f16 refused before
    loading (the kernels take f32 and bf16)."""
    pruned = tmp_path / "p"
    assert main(["prune", str(story_llama_dir), "--method", "magnitude", "--pattern", "2:4", "--out",
                 str(pruned)]) == 0
    capsys.readouterr()
    assert main(["export", str(pruned), "--to", "vllm-sparse", "--no-calibrate", "--outtype", "bf16", "--out",
                 str(tmp_path / "v")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["packed_layers"] == {"2:4": 14, "unstructured": 0} and printed["outtype"] == "bf16"
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sparsefast"
    assert main(["export", str(tmp_path / "missing"), "--to", "vllm-sparse", "--outtype", "f16", "--out",
                 str(tmp_path / "w")]) == 2
    assert "f32, bf16" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_bad_input_fails_before_loading(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    assert main(["export", missing, "--to", "vllm", "--outtype", "q8_0", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "GGUF type" in err and "no-such-model" not in err
    (tmp_path / "taken.gguf").write_text("x")
    assert main(["export", str(tmp_path), "--to", "gguf", "--out", str(tmp_path / "taken.gguf")]) == 2
    assert not (tmp_path / "v").exists()


def test_help_imports_no_torch():
    code = ("import sys; from sparsefast.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_prune_structured_uniform_then_export(tmp_path, story_llama_dir, capsys):
    """`prune-structured --uniform` writes a plain checkpoint (no structure.json), which exports to llama.cpp's
    plain `llama` architecture; the layer-wise default needs `deci`."""
    plain = tmp_path / "u"
    assert main(["prune-structured", str(story_llama_dir), "--ratio", "0.3", "--importance", "l2", "--uniform",
                 "--no-progress", "--out", str(plain)]) == 0
    assert not (plain / "structure.json").exists()
    assert json.loads((plain / "config.json").read_text())["num_attention_heads"] == 4
    assert main(["export", str(plain), "--to", "gguf", "--out", str(tmp_path / "u.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "u.gguf").fields["general.architecture"].contents() == "llama"
    assert main(["prune-structured", str(story_llama_dir), "--ratio", "0.3", "--importance", "l2", "--uniform",
                 "--layers", "1-1", "--out", str(tmp_path / "x")]) == 2
    assert "drop --layers" in capsys.readouterr().err
