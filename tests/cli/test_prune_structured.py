"""`sparsefast prune-structured`: end to end on the shared story-llama and on a GGUF model, the parser's defaults and
presets, and bad input before any loading."""

from __future__ import annotations

import json
import re

import pytest
import torch

import sparsefast
import sparsefast.cli.prune_structured as structured_cli
from sparsefast.cli import main

TEXT = " ".join(f"Once upon a time a small fox number {i} walked to the river and met a kind old turtle."
                for i in range(200))


def test_prune_structured_cli_end_to_end(tmp_path, story_llama_dir, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "pruned"
    rc = main(["prune-structured", str(story_llama_dir), "--ratio", "0.25", "--importance", "element1",
               "--aggregation", "sum", "--strategy", "block", "--layers", "0-1", "--calib", str(calib),
               "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(out), "--json",
               str(tmp_path / "report.json")])
    assert rc == 0
    report = json.loads((out / "sparsefast.json").read_text())
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["removed"]["per_layer"]["0"] == {"query_heads": 4, "kv_heads": 0, "mlp_channels":
                                                   report["layers"][0]["intermediate_size"] // 3}
    assert report["after"]["macs_per_token"]["total"] < report["before"]["macs_per_token"]["total"]
    structure = json.loads((out / "structure.json").read_text())
    assert [layer["num_attention_heads"] for layer in structure["layers"]] == [4, 4]
    assert [layer["num_key_value_heads"] for layer in structure["layers"]] == [4, 4]
    from sparsefast.models import load_model

    model, tok = load_model(str(out), device="cpu")
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3 and torch.isfinite(model(ids).logits).all()
    assert main(["prune-structured", str(story_llama_dir), "--ratio", "0.25", "--importance", "l2", "--layers",
                 "0-1", "--out", str(out)]) == 2   # --out exists and no --overwrite
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "-0.2"], "ratio"),
])
def test_bad_ratio_fails_before_loading(tmp_path, capsys, argv, needle):
    rc = main(["prune-structured", str(tmp_path / "no-such-model"), *argv, "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert needle in err and "no-such-model" not in err
    assert not (tmp_path / "o").exists()


def test_layer_range_outside_model(tmp_path, story_llama_dir, capsys):
    rc = main(["prune-structured", str(story_llama_dir), "--ratio", "0.2", "--importance", "l2", "--layers", "1-5",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "outside the model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_choices_are_enforced(tmp_path):
    with pytest.raises(SystemExit):
        main(["prune-structured", "x", "--importance", "taylor", "--out", str(tmp_path)])


def test_default_layer_range_on_a_two_layer_model_suggests_layers(tmp_path, story_llama_dir, capsys):
    rc = main(["prune-structured", str(story_llama_dir), "--importance", "l2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "skips the first and the last decoder layer" in err and "--layers 0-1" in err
    assert not (tmp_path / "o").exists()


def test_seqlen_above_context_is_refused_before_loading(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the seqlen check")

    monkeypatch.setattr(sparsefast.models, "load_model", no_load)
    rc = main(["prune-structured", str(story_llama_dir), "--layers", "0-1", "--seqlen", "513",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "seqlen 513 exceeds the model's context of 512 tokens" in err and "--seqlen 512" in err
    assert not (tmp_path / "o").exists()


def test_no_progress_silences_the_bars(tmp_path, story_llama_dir, capfd):
    import transformers

    argv = ["prune-structured", str(story_llama_dir), "--importance", "l2", "--layers", "0-1", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "it/s]" in capfd.readouterr().err              # the control: loading and saving draw bars
    assert main([*argv, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    captured = capfd.readouterr()
    assert "it/s]" not in captured.err and "%|" not in captured.err, captured.err
    assert "prune-structured:" not in captured.err and "parameters 656,000 -> " in captured.out
    assert transformers.utils.logging.is_progress_bar_enabled()        # restored for the rest of the process


def test_every_phase_reports_progress_and_the_run_ends_with_a_summary(tmp_path, story_llama_dir, capsys):
    """Issue 20, case 9: a line per phase with its time on stderr (a bar over the gradient samples), then on stdout
    the same human summary as `prune` (parameters before -> after, time, "saved DIR"); the JSON only with --json."""
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "pruned"
    assert main(["prune-structured", str(story_llama_dir), "--ratio", "0.25", "--importance", "element1", "--layers",
                 "0-1", "--calib", str(calib), "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out",
                 str(out)]) == 0
    captured = capsys.readouterr()
    lines = re.split(r"[\r\n]", captured.err)  # tqdm redraws with carriage returns
    for phase in ("graph", "calibration", "importance", "pruning"):
        assert any(re.fullmatch(rf"prune-structured: {phase}: .*\(\d+\.\d s\)", ln) for ln in lines), phase
    assert f"prune-structured: saving {out}" in captured.err and "importance: gradients" in captured.err
    report = json.loads((out / "sparsefast.json").read_text())
    before, after = report["before"]["parameters"], report["after"]["parameters"]
    lines = captured.out.strip().splitlines()
    assert f"parameters {before:,} -> {after:,}" in lines[-2] and re.search(r"in \d+\.\d s \(", lines[-2])
    assert re.fullmatch(rf"saved {re.escape(str(out))} \(\d+\.\d s\)", lines[-1])
    assert "{" not in captured.out  # no JSON blob without --json


def test_json_is_not_replaced_without_overwrite(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --json was checked")

    monkeypatch.setattr(models, "load_model", no_load)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    rc = main(["prune-structured", str(story_llama_dir), "--layers", "0-1", "--out", str(tmp_path / "o"), "--json",
               str(notes)])
    assert rc == 2 and "notes.txt exists; choose another file name or pass --overwrite" in capsys.readouterr().err
    assert notes.read_text() == "the user's notes" and not (tmp_path / "o").exists()


def test_preset_and_explicit_options(tmp_path):
    from sparsefast.cli import build_parser
    from sparsefast.cli.prune_structured import config_from_args

    def config(*extra):
        return config_from_args(build_parser().parse_args(["prune-structured", "m", "--out", str(tmp_path), *extra]))

    cfg = config("--preset", "llm-pruner")
    assert (cfg.importance, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.rounding, cfg.layers, cfg.gqa) == (
        "element1", 10, 64, 42, "keep_floor", "4-29@32", "kv_groups")
    cfg = config("--preset", "llm-pruner", "--seed", "0", "--attn-layers", "1-2", "--importance", "element2")
    assert (cfg.seed, cfg.attn_layers, cfg.mlp_layers, cfg.layers, cfg.importance) == (0, "1-2", None, "4-29@32",
                                                                                     "element2")
    plain = config("--layers", "0-1", "--mlp-layers", "1-1")
    assert plain.layer_ranges(2) == ((0, 2), (1, 2)) and (plain.seed, plain.rounding) == (0, "half_up")


def test_bad_attention_range_fails_before_loading(tmp_path, capsys):
    rc = main(["prune-structured", str(tmp_path / "no-such-model"), "--attn-layers", "3", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--attn-layers" in err and "no-such-model" not in err


def test_flags_left_out_give_the_config_defaults(tmp_path):
    from sparsefast.cli import build_parser
    from sparsefast.config import StructuralConfig

    args = build_parser().parse_args(["prune-structured", "m", "--out", str(tmp_path)])
    assert structured_cli.config_from_args(args) == StructuralConfig()


def test_missing_data_dir_is_an_error_before_loading(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    nowhere = tmp_path / "nowhere"
    rc = main(["prune-structured", str(story_llama_dir), "--importance", "l2", "--layers", "0-1",
               "--out", str(tmp_path / "o"), "--data-dir", str(nowhere)])
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith(("Loading", "Writing"))]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sparsefast prune-structured: error:")
    assert f"--data-dir {nowhere} does not exist" in lines[0]


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
    code = main(["prune-structured", str(src), "--importance", "l2", "--ratio", "0.5", "--layers", "0-1",
                 "--device", "cpu", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "structure.json").is_file() and not list(out.glob("*.gguf"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, tok = sparsefast.load(out)
    assert model.model.layers[0].mlp.up_proj.out_features == 32
    ids = torch.tensor([[1, 5, 9]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
