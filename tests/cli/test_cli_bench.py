"""`sparsefast bench prune`: every method on the same weights and ids, the JSON it writes, errors before work."""

from __future__ import annotations

import json

from sparsefast.cli import main


def test_bench_prune_writes_every_method(tmp_path, story_llama_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "prune", str(story_llama_dir), "--methods", "magnitude,wanda-torch,sparsegpt",
                 "--pattern", "2:4", "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"magnitude", "wanda-torch", "sparsegpt"} and res["pattern"] == "2:4"
    assert res["calibration"]["nsamples"] == 2 and res["calibration"]["seqlen"] == 16
    for r in res["methods"].values():
        assert abs(r["achieved_sparsity"] - 0.5) < 1e-6
        assert len(r["per_layer"]) == res["layers"]
        assert r["total_s"] == r["calib_forward_s"] + r["metric_mask_s"]
    assert res["ratios_vs"] == "wanda-torch" and res["ratios"]["wanda-torch"]["total_s"] == 1.0


def test_bench_prune_bad_input_fails_before_work(tmp_path, story_llama_dir, capsys):
    assert main(["bench", "prune", str(story_llama_dir), "--methods", "wanda,magic", "--device", "cpu"]) == 2
    assert "unknown method(s) ['wanda', 'magic']" in capsys.readouterr().err
    missing = tmp_path / "no" / "dir" / "bench.json"
    assert main(["bench", "prune", str(story_llama_dir), "--device", "cpu", "--json", str(missing)]) == 2
    err = capsys.readouterr()
    assert "does not exist" in err.err and "magnitude" not in err.out  # no method ran
