"""`sparsefast bench prune`: every method on the same weights and ids, the JSON it writes, errors before work;
`sparsefast bench serve`: its options reach the benchmark, bad ones fail before a server starts."""

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


def test_bench_serve_bad_options_are_one_line_before_any_server(tmp_path, capsys):
    base = ["bench", "serve", "--variant", "a=url:http://127.0.0.1:9", "--log-dir", str(tmp_path)]
    for extra, message in ((["--concurrency", "1,x"], "--concurrency must be a comma list of integers, got '1,x'"),
                           (["--num-prompts", "4,4,4"], "--num-prompts lists 3 values for 2 concurrency levels"),
                           (["--concurrency", "1", "--num-prompts", "4,0"], "--num-prompts must list integers >= 1"),
                           (["--baseline", "b"], "--baseline 'b' is not a variant name"),
                           (["--variant", "a=url:http://127.0.0.1:8"], "--variant names must be unique")):
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not any(tmp_path.iterdir())  # no server log: nothing started


def test_bench_prune_zero_sizes_and_cpu_peak_rss(tmp_path, story_llama_dir, capsys):
    for flag in ("--nsamples", "--seqlen"):
        code = main(["bench", "prune", str(story_llama_dir), "--device", "cpu", flag, "0"])
        captured = capsys.readouterr()
        assert code == 2 and f"{flag} must be >= 1, got 0" in captured.err and "magnitude" not in captured.out
    js = tmp_path / "b.json"
    code = main(["bench", "prune", str(story_llama_dir), "--methods", "magnitude", "--nsamples", "1", "--seqlen", "8",
                 "--device", "cpu", "--json", str(js)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rss = json.loads(js.read_text())["methods"]["magnitude"]["peak_rss_bytes"]
    assert rss > 50 * 2**20 and f"peak RSS {rss / 2**30:.2f} GiB" in captured.out
    assert "peak 0.00 GiB" not in captured.out
