"""The CLI never loses data and never shows a traceback: --out guards, a lost publish race, Ctrl-C, broken inputs,
missing --data-dir, bench argument checks and peak RSS, and the structural save of a GGUF model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparsefast
from sparsefast.cli import main

STORY = "Once upon a time there was a little fox who lived in the forest with her family. " * 40


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("Loading", "Writing"))]
    assert len(lines) == 1 and lines[0].startswith(f"sparsefast {command}: error:"), err
    return lines[0]


MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.25", "--device", "cpu", "--no-progress"]


@pytest.fixture()
def pruned_src(tmp_path, story_llama_dir, capsys):
    """A mask-pruned checkpoint (our own output): the case where --overwrite alone would allow replacing it."""
    src = tmp_path / "pruned-src"
    assert run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(src)], capsys)[0] == 0
    return src


def test_out_is_the_model_source(pruned_src, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in pruned_src.iterdir())
    code, _, err = run(["prune", str(pruned_src), *MAGNITUDE, "--out", str(pruned_src), "--overwrite"], capsys)
    assert code == 2 and "is the model source" in one_error_line(err, "prune")
    code, _, err = run(["prune", str(pruned_src), *MAGNITUDE, "--out", str(pruned_src.parent), "--overwrite"],
                       capsys)
    assert code == 2 and ("contains the model source" in err or "current directory" in err)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in pruned_src.iterdir()) == before


def test_out_dot_never_replaces_the_working_directory(tmp_path, story_llama_dir, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (work / "sparsefast.json").write_text("{}")  # even a folder that looks like ours
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", out, "--overwrite"], capsys)
        assert code == 2 and "current directory" in one_error_line(err, "prune"), err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "sparsefast.json"]


def test_a_lost_publish_race_is_exit_2_and_keeps_the_winner(tmp_path, story_llama_dir, monkeypatch, capsys):
    """Another process publishes --out while this one is saving: this one must not replace it."""
    out = tmp_path / "out"
    real = transformers.PreTrainedModel.save_pretrained

    def save_then_lose(self, path, **kw):
        real(self, path, **kw)
        out.mkdir()
        (out / "sparsefast.json").write_text('{"method": "the other writer"}')

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_lose)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(out)], capsys)
    assert code == 2 and "this result was not saved" in one_error_line(err, "prune")
    assert json.loads((out / "sparsefast.json").read_text())["method"] == "the other writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_is_exit_130_and_writes_nothing(tmp_path, story_llama_dir, monkeypatch, capsys):
    out = tmp_path / "out"

    def interrupted(self, path, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", interrupted)
    code, _, err = run(["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(out)], capsys)
    last = err.strip().splitlines()[-1]
    assert code == 130 and last == f"sparsefast prune: interrupted; nothing was written to {out}"
    assert list(tmp_path.iterdir()) == []


def test_broken_inputs_are_one_line(tmp_path, story_llama_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in story_llama_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 3] if f.suffix == ".safetensors" else data)
    code, _, err = run(["eval", str(broken), "--ppl", "wikitext2", "--seqlen", "32", "--max-windows", "1",
                        "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and "model.safetensors: not a complete safetensors file" in one_error_line(err, "eval")
    gz = tmp_path / "calib.txt.gz"
    gz.write_text(STORY)
    code, _, err = run(["prune", str(story_llama_dir), "--calib", str(gz), "--nsamples", "1", "--seqlen", "32",
                        "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "calib.txt.gz: not a valid gzip file" in one_error_line(err, "prune")
    binary = tmp_path / "calib.bin.txt"
    binary.write_bytes(bytes(range(128, 256)) * 64)
    code, _, err = run(["prune", str(story_llama_dir), "--calib", str(binary), "--nsamples", "1", "--seqlen", "32",
                        "--device", "cpu", "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and "calib.bin.txt: not UTF-8 text" in one_error_line(err, "prune")
    assert not (tmp_path / "o").exists()


def test_missing_data_dir_is_an_error_before_loading(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    nowhere = tmp_path / "nowhere"
    for argv in (["prune", str(story_llama_dir), *MAGNITUDE, "--out", str(tmp_path / "o")],
                 ["eval", str(story_llama_dir), "--ppl", "wikitext2", "--device", "cpu"],
                 ["prune-structured", str(story_llama_dir), "--importance", "l2", "--layers", "0-1",
                  "--out", str(tmp_path / "o")]):
        code, _, err = run([*argv, "--data-dir", str(nowhere)], capsys)
        assert code == 2 and f"--data-dir {nowhere} does not exist" in one_error_line(err, argv[0]), argv


def test_bench_prune_zero_sizes_and_cpu_peak_rss(tmp_path, story_llama_dir, capsys):
    for flag in ("--nsamples", "--seqlen"):
        code, out, err = run(["bench", "prune", str(story_llama_dir), "--device", "cpu", flag, "0"], capsys)
        assert code == 2 and f"{flag} must be >= 1, got 0" in err and "magnitude" not in out
    js = tmp_path / "b.json"
    code, out, err = run(["bench", "prune", str(story_llama_dir), "--methods", "magnitude", "--nsamples", "1",
                          "--seqlen", "8", "--device", "cpu", "--json", str(js)], capsys)
    assert code == 0, err
    rss = json.loads(js.read_text())["methods"]["magnitude"]["peak_rss_bytes"]
    assert rss > 50 * 2**20 and f"peak RSS {rss / 2**30:.2f} GiB" in out and "peak 0.00 GiB" not in out


def write_tiny_llama_gguf(path, vocab=64, hidden=32, inter=64, heads=4, kv=2, layers=2, seed=0):
    """A tiny float32 LLaMA GGUF (with a small SentencePiece-style vocabulary) written with the `gguf` package."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    pieces = [b"<unk>", b"<s>", b"</s>"] + ["\u2581{}".format(chr(97 + i % 26) * (1 + i // 26)).encode()
                                           for i in range(vocab - 3)]
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(vocab, hidden))
    kv_rows = kv * (hidden // heads)
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_rows, hidden)), ("attn_v", (kv_rows, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(vocab, hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_model_prunes_structurally_and_saves(tmp_path, capsys):
    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "sliced"
    code, stdout, err = run(["prune-structured", str(src), "--importance", "l2", "--ratio", "0.5", "--layers", "0-1",
                             "--device", "cpu", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert (out / "structure.json").is_file() and not list(out.glob("*.gguf"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = sparsefast.load(out)
    assert model.model.layers[0].mlp.up_proj.out_features == 32
    ids = torch.tensor([[1, 5, 9]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_unsavable_quantized_model_is_refused_before_work():
    from sparsefast.checkpoint import check_savable
    from tests.conftest import tiny_model

    class Quantizer:
        quantization_config = type("QC", (), {"quant_method": "bitsandbytes"})()

        @staticmethod
        def is_serializable():
            return False

    model = tiny_model("llama")
    model.hf_quantizer = Quantizer()
    with pytest.raises(ValueError, match="quantized with bitsandbytes, which transformers cannot save"):
        check_savable(model)
