"""bench/e2e/dsnot_error.py on the tiny story llama: a row per layer x linear x pattern with both masks' errors on
both halves, DSnoT lowering the mean error it targets on the fitting half (unstructured), and the result JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "e2e" / "dsnot_error.py"


def test_rows_for_every_layer_linear_and_pattern(tmp_path, story_llama_dir, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("dsnot_error_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    assert bench.main(["--model", str(story_llama_dir), "--layers", "0,1", "--nsamples", "4", "--seqlen", "64"]) == 0
    (result,) = tmp_path.glob("*-cpu-model-dsnot-error.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["layer"], r["linear"], r["pattern"]) for r in rows] == [
        (i, n, p) for i in (0, 1) for n in bench.LINEARS for p in bench.PATTERNS]
    for r in rows:
        assert r["swapped"] > 0 and all(r[f"{h}_{t}_rel_sq"] > 0 for h in ("fit", "held") for t in ("wanda", "dsnot"))
        if r["pattern"] != "2:4":  # unstructured swaps move the error towards zero; N:M keeps only its sign
            assert r["fit_dsnot_mean_error"] < r["fit_wanda_mean_error"]
    assert "raised the held-out squared error" in capsys.readouterr().out
