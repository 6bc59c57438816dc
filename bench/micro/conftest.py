"""Microbenchmark fixtures. On CUDA: the real layer shapes (sparsefast.bench.shapes), results to bench/results/ (and
$OUT). Without CUDA (CI): quick mode — tiny shapes under TRITON_INTERPRET=1, results to a temp dir — so the harness,
the baselines and the JSON writer stay exercised; those timings mean nothing.

Each benchmark module appends rows to `results[what]`; the session writes one JSON per `what` at the end
(sparsefast.bench.results.write_result), with the copy bandwidth measured once at the start of the session."""

from __future__ import annotations

import os

import pytest

from sparsefast.bench.shapes import MODELS, NUM_LAYERS, PER_LAYER, quick_mode

QUICK = quick_mode()
if QUICK:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton kernel is imported

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the device image may lack the plugin: a stand-in that runs the function once
    @pytest.fixture
    def benchmark():
        return lambda fn, *args, **kwargs: fn(*args, **kwargs)


@pytest.fixture(scope="session")
def quick() -> bool:
    return QUICK


@pytest.fixture(scope="session")
def device() -> str:
    return "cpu" if QUICK else "cuda"


@pytest.fixture(scope="session")
def copy_gbs(device) -> float:
    from sparsefast.bench.memory import copy_bandwidth_gbs

    return copy_bandwidth_gbs(device, nbytes=1 << 22 if QUICK else None)  # quick: a small copy, harness only


@pytest.fixture(scope="session")
def results(copy_gbs, tmp_path_factory):
    from sparsefast.bench.results import write_result

    collected: dict[str, list[dict]] = {}
    yield collected
    out_dir = tmp_path_factory.mktemp("bench-results") if QUICK else None
    for what, rows in collected.items():
        payload = {"copy_bandwidth_gbs": copy_gbs, "rows": rows,
                   "model_shapes": {"models": MODELS, "per_layer": PER_LAYER, "num_layers": NUM_LAYERS}}
        for path in write_result(what, payload, out_dir=out_dir):
            print(f"\nwrote {path}")
