"""`sparsefast prune-structured`: end to end on the shared story-llama, and bad input before any loading."""

from __future__ import annotations

import json

import pytest
import torch

from sparsefast.cli import main

TEXT = " ".join(f"Once upon a time a small fox number {i} walked to the river and met a kind old turtle."
                for i in range(200))


def test_prune_structured_cli_end_to_end(tmp_path, story_llama_dir, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "pruned"
    rc = main(["prune-structured", str(story_llama_dir), "--ratio", "0.25", "--importance", "element1",
               "--aggregation", "sum", "--strategy", "block", "--layers", "0-1", "--calib", str(calib),
               "--nsamples", "2", "--seqlen", "32", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["parameters"][1] < printed["parameters"][0]
    report = json.loads((out / "sparsefast.json").read_text())
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
