"""bench/e2e/prune_from_disk.py end to end on a small random LLaMA: the model it writes, both paths' peak RSS, the
byte comparison, the result JSON, and a non-zero exit when a case fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e" / "prune_from_disk.py"


@pytest.fixture()
def bench(monkeypatch, tmp_path, shared_dir):
    spec = importlib.util.spec_from_file_location("prune_from_disk_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SHAPE", {**module.SHAPE, "hidden_size": 128, "intermediate_size": 256,
                                          "num_attention_heads": 4, "num_key_value_heads": 2})
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "results"))
    return module


@pytest.mark.parametrize("case, gib", [("wanda-2:4", "0.003"), ("structured-20%", "0.005")])  # 0.005: 4 layers
def test_both_paths_measured_and_identical(bench, tmp_path, shared_dir, capsys, case, gib):
    work = tmp_path / "work"
    argv = ["--gib", gib, "--cases", case, "--work-dir", str(work), "--shared", str(shared_dir)]
    assert bench.main(argv) == 0, capsys.readouterr()
    (result,) = (tmp_path / "results").glob("*-cpu-prune-from-disk.json")
    data = json.loads(result.read_text())
    (r,) = data["results"]
    assert r["bit_identical"] and r["files_equal"]["model.safetensors"] and r["files_equal"]["config.json"]
    assert r["weight_bytes"] >= float(gib) * 2**30 and r["layers"] >= 2
    assert [x["from_disk"] for x in r["runs"]] == ["on", "off"] and all(x["peak_rss_bytes"] > 0 for x in r["runs"])
    marker = json.loads((work / f"random-llama-{gib}gib" / bench.MARKER).read_text())
    assert marker["layers"] == r["layers"]
    assert bench.main(argv) == 0  # the model is reused, not rewritten
    assert not list(work.glob("outputs-*"))  # pruned checkpoints removed without --keep-outputs
    assert data["import_baseline_rss_bytes"] > 100 * 2**20 and data["mem_total_bytes"] > 2**30


def test_a_failed_case_exits_non_zero(bench, tmp_path, shared_dir, monkeypatch, capsys):
    # 7 divides no width
    monkeypatch.setitem(bench.CASES, "wanda-2:4", ["prune", "--method", "wanda", "--pattern", "3:7"])
    argv = ["--gib", "0.003", "--cases", "wanda-2:4", "--work-dir", str(tmp_path / "w"), "--shared", str(shared_dir)]
    assert bench.main(argv) == 1
    assert "DIFFER or failed" in capsys.readouterr().out
