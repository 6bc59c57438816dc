"""sparsefast.bench.serving_report: ratios against the baseline and the peer, merged runs, the plot, and every
setting refused before a server starts."""

from __future__ import annotations

import json

import pytest

from sparsefast.bench.serving_report import failures, merge_runs, parse_int_list, plot, ratios, run_serving_benchmark


def _level(tpot_p50: float, tpot_mean: float, throughput: float) -> dict:
    return {"completed": 4, "tpot_ms": {"p50": tpot_p50, "mean": tpot_mean}, "output_throughput_tok_s": throughput}


OUT = {"variants": [
    {"name": "dense", "levels": {"1": _level(70.0, 71.0, 13.0), "8": _level(120.0, 118.0, 52.0)}},
    {"name": "w24", "levels": {"1": _level(35.0, 36.0, 26.0), "8": _level(80.0, 80.0, 78.0)}},
    {"name": "peer", "levels": {"1": _level(80.0, 80.0, 12.0), "8": _level(80.0, 119.0, 12.0)}}]}


def test_ratios_against_the_baseline_and_the_peer_goal():
    r = ratios(OUT, "dense", "peer", [1, 8])
    assert r["1"]["w24"] == {"tpot_p50_vs_baseline": 0.5, "output_throughput_vs_baseline": 2.0}
    assert "dense" not in r["1"]
    assert r["1"]["goal_baseline_tpot_le_peer"] == {"baseline_tpot_p50_ms": 70.0, "peer_tpot_p50_ms": 80.0,
                                                    "met_p50": True, "met_mean": True}
    assert r["8"]["goal_baseline_tpot_le_peer"]["met_p50"] is False
    assert r["8"]["goal_baseline_tpot_le_peer"]["met_mean"] is True
    assert r["throughput_scaling"]["dense"] == pytest.approx(4.0) and r["throughput_scaling"]["peer"] == 1.0
    assert "throughput_scaling" not in ratios(OUT, "dense", None, [1])


def test_merge_runs_and_plot(tmp_path):
    runs = []
    for c in ("1", "8"):
        run = {"what": "serving", "machine": {"Model name": "cpu"}, "versions": {}, "date": "d", "git_commit": "g",
               "settings": {"concurrency": [int(c)], "device": "cpu", "prompt_len": 8, "output_len": 4},
               "ratios": {c: {}}, "variants": [{"name": v["name"], "levels": {c: v["levels"][c]}}
                                               for v in OUT["variants"]]}
        runs.append(tmp_path / f"{c}.json")
        runs[-1].write_text(json.dumps(run))
    merged = merge_runs(runs)
    assert merged["settings"]["concurrency"] == [1, 8] and len(merged["runs"]) == 2
    assert [sorted(v["levels"]) for v in merged["variants"]] == [["1", "8"]] * 3
    plot(merged, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_int_list():
    assert parse_int_list("1, 8,", "--concurrency") == [1, 8]
    with pytest.raises(ValueError, match="--concurrency must be a comma list of integers, got '1,x'"):
        parse_int_list("1,x", "--concurrency")
    with pytest.raises(ValueError, match="--num-prompts must list integers >= 1"):
        parse_int_list("0", "--num-prompts")


@pytest.mark.parametrize("kwargs, message", [
    ({"variant_specs": ["a=url:http://h:1", "a=url:http://h:2"]}, "names must be unique"),
    ({"baseline": "b"}, "--baseline 'b' is not a variant name"),
    ({"peer": "b"}, "--peer 'b' is not a variant name"),
    ({"num_prompts": [4, 4, 4]}, "--num-prompts lists 3 values for 2 concurrency levels"),
    ({"rounds": 0}, "--rounds must be >= 1"),
    ({"output_len": 1}, "--output-len must be >= 2"),
    ({"variant_specs": ["a"]}, "NAME=KIND:TARGET"),
    ({"json_path": "/nonexistent-dir/r.json"}, "does not exist or is not writable"),
])
def test_bad_settings_fail_before_any_server(tmp_path, kwargs, message):
    args = {"variant_specs": ["a=url:http://127.0.0.1:9"], "concurrency": [1, 8], "log_dir": str(tmp_path), **kwargs}
    with pytest.raises(ValueError, match=message):
        run_serving_benchmark(args.pop("variant_specs"), **args)
    assert not any(tmp_path.iterdir())  # no server log: nothing started


def test_failures_name_dead_servers_and_failed_requests():
    out = {"variants": [{"name": "ok", "error": None, "levels": {"1": {"completed": 4, "failed": 0, "errors": []}}},
                        {"name": "late", "error": None, "levels": {"1": {"completed": 4, "failed": 0, "errors": []},
                                                                    "8": {"completed": 30, "failed": 2,
                                                                          "errors": ["ReadTimeout: "]}}},
                        {"name": "dead", "error": "not healthy within 300 s; log: x.log", "levels": {}}]}
    assert failures(out) == {"late": "2 of 32 requests failed at concurrency 8: ReadTimeout: ",
                             "dead": "not healthy within 300 s; log: x.log"}


def test_the_plot_replaces_a_file_only_with_overwrite(tmp_path):
    run = {"machine": {}, "settings": {"device": "cpu", "prompt_len": 8, "output_len": 4}, "variants": OUT["variants"]}
    png = tmp_path / "p.png"
    png.write_text("the user's picture")
    with pytest.raises(FileExistsError, match="p.png appeared while this result was being written"):
        plot(run, png, overwrite=False)
    assert png.read_text() == "the user's picture" and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    plot(run, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
