"""sparsefast.bench.results: the one result naming, the device slug, the metadata every result carries, $OUT."""

from __future__ import annotations

import datetime
import json

import pytest

from sparsefast.bench.results import commit_of, gpu_slug, kernel_isa, result_name, result_path, slug, write_result
from sparsefast.ops.sparse24_cpu import ISAS


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                            ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
                                            ("Tesla T4", "t4"), ("NVIDIA L40S", "l40s"), ("NVIDIA", "gpu")])
def test_gpu_slug_is_the_model_in_lower_case(name, expected):
    assert gpu_slug(name) == expected


def test_result_name_follows_the_one_convention():
    day = datetime.date(2026, 11, 23)
    assert result_name("sparse24_matmul", "h100", date=day) == "2026-11-23-h100-sparse24-matmul.json"
    assert result_name("Serve", "cpu", ext="png", date=day) == "2026-11-23-cpu-serve.png"
    assert slug("decode smollm2/x") == "decode-smollm2-x"
    with pytest.raises(ValueError, match="measurement name"):
        result_name("--", "cpu")


def test_result_path_honours_the_results_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    path = result_path("decode-smollm2", device="cpu")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert path == tmp_path / f"{today}-cpu-decode-smollm2.json"
    assert result_path("x", device="cpu", out_dir=tmp_path / "o").parent == tmp_path / "o"


def test_write_result_carries_the_metadata_and_copies_to_out(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    paths = write_result("wanda_mask", {"rows": [1, 2]}, device="cpu")
    assert [p.parent.name for p in paths] == ["results", "out"] and paths[0].name == paths[1].name
    assert paths[0].name.endswith("-cpu-wanda-mask.json")
    data = json.loads(paths[1].read_text())
    assert data["what"] == "wanda_mask" and data["rows"] == [1, 2]
    meta = data["metadata"]
    assert meta["device"] == "cpu" and meta["device_slug"] == "cpu" and meta["git_commit"]
    assert {"torch", "python", "load_average", "cpu", "date"} <= set(meta)
    # an explicit out_dir is the only destination
    only = write_result("x", {}, device="cpu", out_dir=tmp_path / "elsewhere")
    assert [p.parent.name for p in only] == ["elsewhere"]


def test_kernel_isa_is_the_forced_one_or_the_best(monkeypatch):
    monkeypatch.setenv("SPARSEFAST_CPU_ISA", "avx2")
    assert kernel_isa() == "avx2"
    monkeypatch.delenv("SPARSEFAST_CPU_ISA")
    best = kernel_isa()  # None only where the CPU extension did not build
    assert best is None or best in set(ISAS) - {"auto"}
    monkeypatch.setenv("SPARSEFAST_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="unknown instruction set 'avx1024'"):
        kernel_isa()


def test_commit_of_reads_new_and_old_results():
    assert commit_of({"metadata": {"git_commit": "abc"}, "git_commit": "old"}) == "abc"
    assert commit_of({"git_commit": "old"}) == "old"
    assert commit_of({}) is None
