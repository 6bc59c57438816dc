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


def test_bench_serve_that_measured_nothing_fails_and_writes_nothing(tmp_path, capsys):
    """Issue 20, case 8: every server failed (here: nothing listens on the port), so the run exits non-zero and
    writes neither the JSON nor the plot."""
    from sparsefast.bench.serving import free_port

    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    code = main(["bench", "serve", "--variant", f"dead=url:http://127.0.0.1:{free_port()}", "--load-timeout", "1",
                 "--concurrency", "1", "--output-len", "4", "--log-dir", str(tmp_path / "logs"), "--json", str(out),
                 "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 1 and "1 variant(s) failed (dead: not healthy within 1 s" in captured.err
    assert "no result was written" in captured.err and not out.exists() and not png.exists()


def _level(completed: int, failed: int) -> dict:
    ms = {"mean": 10.0, "p50": 10.0}
    return {"completed": completed, "failed": failed, "errors": ["HTTP 500: b'engine_error'"] if failed else [],
            "tpot_ms": ms, "output_throughput_tok_s": 5.0, "ttft_ms": ms, "itl_ms": ms, "e2el_ms": ms}


def test_bench_serve_marks_a_failed_variant_and_exits_non_zero(tmp_path, capsys, monkeypatch):
    import sparsefast.bench.serving_report as report

    def measured(variants, *a, **k):
        return {"variants": [{"name": "ok", "error": None, "levels": {"1": _level(4, 0)}},
                             {"name": "flaky", "error": None, "levels": {"1": _level(3, 1)}},
                             {"name": "dead", "error": "server exited with code 1 before serving", "levels": {}}]}

    monkeypatch.setattr(report, "_measure", measured)
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--variant", "ok=url:http://h:1", "--variant", "flaky=url:http://h:2",
                 "--variant", "dead=url:http://h:3", "--concurrency", "1", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "2 variant(s) failed" in err and "the result marks them failed" in err
    assert json.loads(out.read_text())["failed"] == {
        "flaky": "1 of 4 requests failed at concurrency 1: HTTP 500: b'engine_error'",
        "dead": "server exited with code 1 before serving"}
    code = main(["bench", "serve", "--variant", "ok=url:http://h:1", "--concurrency", "1", "--json", str(out)])
    assert code == 2 and "serve.json exists; choose another file name or pass --overwrite" in capsys.readouterr().err


def test_bench_prune_records_a_failed_method_and_exits_non_zero(tmp_path, story_llama_dir, capsys, monkeypatch):
    import sparsefast.api as api

    real = api.prune

    def sparsegpt_breaks(model, config, *a, **k):
        if config.method == "sparsegpt":
            raise RuntimeError("CUDA out of memory\n(simulated)")
        return real(model, config, *a, **k)

    monkeypatch.setattr(api, "prune", sparsegpt_breaks)
    out = tmp_path / "bench.json"
    code = main(["bench", "prune", str(story_llama_dir), "--methods", "magnitude,sparsegpt", "--nsamples", "1",
                 "--seqlen", "8", "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "1 method(s) failed (sparsegpt: RuntimeError: CUDA out of memory (simulated))" in captured.err
    assert [ln for ln in captured.err.splitlines() if "error" in ln] == [captured.err.splitlines()[-1]]  # one line
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"magnitude"} and res["failed"] == {
        "sparsegpt": "RuntimeError: CUDA out of memory\n(simulated)"}
    code = main(["bench", "prune", str(story_llama_dir), "--methods", "sparsegpt", "--nsamples", "1", "--seqlen", "8",
                 "--device", "cpu", "--json", str(tmp_path / "none.json")])
    assert code == 1 and "no result was written" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()
    code = main(["bench", "prune", str(story_llama_dir), "--device", "cpu", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "bench.json exists" in captured.err and "magnitude" not in captured.out  # before any work
