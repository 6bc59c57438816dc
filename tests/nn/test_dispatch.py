"""sparsefast.nn.dispatch: dispatch tables (rows, loading, the per-device default), the per-input decision of each
module class, the choice among measured CPU layouts, and the CPU calibration, which times both candidates from DRAM:
each rotates through distinct copies of its weight that together exceed the last-level cache (here monkeypatched
small), and frees them afterwards."""

from __future__ import annotations

import gc
import json
import math
import weakref

import pytest
import torch

from sparsefast.nn import dispatch
from sparsefast.nn.dispatch import (
    COLD_FOOTPRINT_LLC,
    COLD_MAX_BYTES,
    DEFAULT_CPU_DISPATCH,
    DEFAULT_DISPATCH,
    LLC_FALLBACK_BYTES,
    DispatchTable,
    calibrate_cpu_dispatch,
    clear_calibration_cache,
    cold_copies,
    cpu_backend_for,
    default_dispatch,
    device_family,
    fastest_cpu_layout,
    last_level_cache_bytes,
    load_dispatch_table,
    sparse24_backend_for,
    table_from_timings,
    tokens_of,
)

LLC = 64 << 10  # the monkeypatched last-level cache: 8 copies of a 32 x 64 fp32 weight (8 KiB) fill it


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_calibration_cache()
    yield
    clear_calibration_cache()


def test_dispatch_table_rows_and_loading(tmp_path):
    table = DispatchTable(((16, "cuda"), (1024, "semi_structured"), (2**62, "dense")))
    assert [table.backend_for(m) for m in (1, 16, 17, 1024, 5000)] == ["cuda", "cuda", "semi_structured",
                                                                       "semi_structured", "dense"]
    with pytest.raises(ValueError, match="unknown backend"):
        DispatchTable(((4, "cublas"),))
    with pytest.raises(ValueError, match="increase"):
        DispatchTable(((8, "cuda"), (8, "dense")))
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rows": [[32, "cuda"], [4096, "semi_structured"]], "device": "x"}))
    assert load_dispatch_table(path).backend_for(100) == "semi_structured"
    with pytest.raises(FileNotFoundError):
        load_dispatch_table(tmp_path / "missing.json")


def test_default_dispatch_by_device_family(monkeypatch, tmp_path):
    assert device_family("NVIDIA H100 80GB HBM3") == "h100" and device_family("NVIDIA H200") == "h200"
    assert device_family("NVIDIA A100-SXM4-80GB") is None
    monkeypatch.delenv(dispatch.TABLE_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    shipped = default_dispatch(cuda)
    assert shipped.source.endswith("dispatch_tables/h100.json")
    assert shipped.rows == tuple((m, b) for m, b in
                                 json.loads((dispatch.SHIPPED_TABLES / "h100.json").read_text())["rows"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert default_dispatch(cuda) is DEFAULT_DISPATCH  # no table measured for this family
    assert default_dispatch(torch.device("cpu")) is DEFAULT_DISPATCH
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"rows": [[4, "dense"], [8, "cuda"]]}))
    monkeypatch.setenv(dispatch.TABLE_ENV, str(path))  # the override wins over the shipped table
    assert default_dispatch(cuda).rows == ((4, "dense"), (8, "cuda"))


def test_table_from_timings_needs_the_margin():
    table = table_from_timings({1: (1.0, 2.0), 4: (1.0, 2.0), 16: (3.0, 2.0), 64: (0.96, 1.0)}, "t")
    assert table.rows == ((10, "cpu"), (2**62, "dense"))  # 0.96 of dense is inside the noise margin: dense
    assert [table.backend_for(m) for m in (1, 10, 11, 500)] == ["cpu", "cpu", "dense", "dense"]


def test_cpu_backend_for_follows_the_table_where_the_kernels_run(monkeypatch):
    values = torch.zeros(2, 1, 8, 16)
    assert tokens_of(torch.zeros(3, 5, 8)) == 15 and tokens_of(torch.zeros(8)) == 1
    monkeypatch.setattr(dispatch, "load_cpu_extension", lambda: True)
    assert [cpu_backend_for(DEFAULT_CPU_DISPATCH, torch.zeros(m, 8), values) for m in (1, 64, 65)] == \
        ["cpu", "cpu", "dense"]
    assert cpu_backend_for(DEFAULT_CPU_DISPATCH, torch.zeros(2, 8).half(), values) == "dense"  # fp16: no kernel
    assert cpu_backend_for(DEFAULT_CPU_DISPATCH, torch.zeros(2, 8), values.half()) == "dense"
    monkeypatch.setattr(dispatch, "load_cpu_extension", lambda: False)
    assert cpu_backend_for(DEFAULT_CPU_DISPATCH, torch.zeros(1, 8), values) == "dense"  # extension missing


@pytest.mark.parametrize("supported,built,semi_ok,want,asks", [
    (True, True, True, ["cuda", "semi_structured", "dense", "dense"], 1),
    (True, True, False, ["cuda", "cuda", "dense", "dense"], 1),  # torch cannot convert the weight: our kernels
    (False, True, False, ["dense", "dense", "dense", "dense"], 2),  # a case our kernels do not take
    (False, True, True, ["semi_structured", "semi_structured", "dense", "dense"], 2),
    (True, False, True, ["semi_structured", "semi_structured", "dense", "dense"], 2),  # a build without CUDA
    (True, False, False, ["dense", "dense", "dense", "dense"], 2),
])
def test_sparse24_backend_for_falls_back_to_what_can_run(monkeypatch, supported, built, semi_ok, want, asks):
    """The table's choice where it can run, else the other 2:4 path (our kernels need the extension and a case they
    take; semi_structured a weight torch converted), else dense; a "cpu" row means nothing for a CUDA input."""
    table = DispatchTable(((1, "cuda"), (8, "semi_structured"), (16, "dense"), (2**62, "cpu")))
    monkeypatch.setattr(dispatch, "cuda_supported", lambda x, values, in_features: supported)
    monkeypatch.setattr(dispatch, "load_extension", lambda: object() if built else None)
    asked = []

    def semi():
        asked.append(True)
        return torch.zeros(1) if semi_ok else None

    values = torch.zeros(1)
    got = [sparse24_backend_for(table, torch.zeros(m, 64), values, 64, semi) for m in (1, 8, 16, 17)]
    assert got == want and len(asked) == asks  # the semi-structured weight is asked for only where it may run


def test_fastest_cpu_layout_is_the_least_total_time_where_a_kernel_wins():
    wins = DispatchTable(((2, "cpu"), (2**62, "dense")))
    loses = DispatchTable(((2**62, "dense"),))

    def timings(*kernel_ms):
        return {m: {"kernel_ms": k, "dense_ms": 2.0} for m, k in zip((1, 4), kernel_ms)}

    assert fastest_cpu_layout({"2:4": (wins, timings(1.0, 3.0)), "unstructured": (wins, timings(0.5, 3.0))}) == \
        "unstructured"  # 0.5 + 2.0 < 1.0 + 2.0
    assert fastest_cpu_layout({"2:4": (wins, timings(1.0, 3.0)), "unstructured": (loses, timings(0.1, 3.0))}) == \
        "2:4"  # a layout whose table never runs its kernel is no candidate, however its sums compare
    assert fastest_cpu_layout({"unstructured": (loses, timings(3.0, 3.0))}) is None
    assert fastest_cpu_layout({"2:4": (wins, timings(1.0, 3.0)), "unstructured": (wins, timings(1.0, 3.0))}) == "2:4"


def _sysfs(root, caches: list[tuple[int, str, str]]):
    for i, (level, kind, size) in enumerate(caches):
        d = root / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return root


def test_last_level_cache_bytes_reads_sysfs(tmp_path):
    full = _sysfs(tmp_path / "a", [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                   (3, "Unified", "32768K")])
    assert last_level_cache_bytes(full) == 32 << 20
    no_l3 = _sysfs(tmp_path / "b", [(1, "Data", "48K"), (2, "Unified", "2M")])
    assert last_level_cache_bytes(no_l3) == 2 << 20  # no L3: the highest level
    with_l4 = _sysfs(tmp_path / "c", [(3, "Unified", "16M"), (4, "Unified", "128M")])
    assert last_level_cache_bytes(with_l4) == 16 << 20  # L3 when there is one
    bad = _sysfs(tmp_path / "d", [(3, "Unified", "lots")])
    assert last_level_cache_bytes(bad) == LLC_FALLBACK_BYTES
    assert last_level_cache_bytes(tmp_path / "missing") == LLC_FALLBACK_BYTES


def test_cold_copies_exceed_the_llc_within_the_cap():
    assert cold_copies(1 << 20, 32 << 20) == COLD_FOOTPRINT_LLC * 32
    assert cold_copies(3 << 20, 32 << 20) * (3 << 20) >= COLD_FOOTPRINT_LLC * (32 << 20)
    assert cold_copies(1 << 20, 1 << 30) == COLD_MAX_BYTES >> 20  # a huge LLC: the memory cap binds
    assert cold_copies(200 << 20, 32 << 20) == 2  # one copy over the cap: still 2
    assert cold_copies(0, 32 << 20) >= 2


class _Recorder:
    """Fake candidates over 32 x 64 fp32 weights: records which weight copy each call reads (by data_ptr), and a
    weakref to every copy made, so a test can see the rotation and that the copies are freed."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.kernel_ptrs: list[int] = []
        self.dense_ptrs: list[int] = []
        self.refs: list[weakref.ref] = []
        self.copies_made = 0

    def kernel_copy(self):
        packed = self.weight.clone()  # stands in for a packed copy
        self.refs.append(weakref.ref(packed))
        self.copies_made += 1

        def kernel(x, packed=packed):
            self.kernel_ptrs.append(packed.data_ptr())
            return x @ packed.t()
        return kernel

    def dense_route(self, real_route):
        """Wraps dense_layer_route: each dense call records the weight copy it reads."""
        def route(x, w, q=None, scales=None, int8_activations=False):
            inner = real_route(x, w, q, scales, int8_activations)

            def call(x, w, b=None):
                self.dense_ptrs.append(w.data_ptr())
                if w is not self.weight:
                    self.refs.append(weakref.ref(w))
                return inner(x, w, b)
            return call
        return route


def _bytes_between_reuses(ptrs: list[int], copy_bytes: int) -> int:
    """The fewest bytes of OTHER copies read between two uses of the same copy (inf when none is reused)."""
    last: dict[int, int] = {}
    fewest = math.inf
    for i, p in enumerate(ptrs):
        if p in last:
            fewest = min(fewest, len(set(ptrs[last[p] + 1:i]) - {p}) * copy_bytes)
        last[p] = i
    return fewest


def test_calibration_rotates_through_copies_beyond_the_llc_and_frees_them(monkeypatch):
    monkeypatch.setattr(dispatch, "last_level_cache_bytes", lambda: LLC)
    weight = torch.randn(32, 64)
    copy_bytes = weight.numel() * weight.element_size()
    rec = _Recorder(weight)
    monkeypatch.setattr(dispatch, "dense_layer_route", rec.dense_route(dispatch.dense_layer_route))  # what it times
    table, timings = calibrate_cpu_dispatch(rec.kernel_copy, copy_bytes, weight, key=("fake",), reps=10,
                                            budget_s=math.inf)
    monkeypatch.undo()
    assert timings.keys() == {1, 4, 16, 64} and table.source.startswith("measured here")
    n = cold_copies(copy_bytes, LLC)
    assert n * copy_bytes >= COLD_FOOTPRINT_LLC * LLC and n > 2
    # Several distinct copies per candidate, together over the LLC; a one-copy calibration fails here.
    assert rec.copies_made == n and len(set(rec.kernel_ptrs)) == n
    assert len(set(rec.dense_ptrs)) == n and weight.data_ptr() in rec.dense_ptrs
    assert len(set(rec.kernel_ptrs) | set(rec.dense_ptrs)) == 2 * n
    # A copy is read again only after at least an LLC of other copies of the same candidate (plus the other's).
    assert _bytes_between_reuses(rec.kernel_ptrs, copy_bytes) >= LLC
    assert _bytes_between_reuses(rec.dense_ptrs, copy_bytes) >= LLC
    assert len(rec.kernel_ptrs) == len(rec.dense_ptrs)  # interleaved: same number of calls each
    gc.collect()
    assert rec.refs and all(r() is None for r in rec.refs)  # the copies did not outlive the calibration


def test_calibration_is_cached_per_key_without_making_copies(monkeypatch):
    monkeypatch.setattr(dispatch, "last_level_cache_bytes", lambda: LLC)
    weight = torch.randn(32, 64)
    rec = _Recorder(weight)
    first = calibrate_cpu_dispatch(rec.kernel_copy, 8 << 10, weight, key=("k",), reps=3)
    made = rec.copies_made
    assert calibrate_cpu_dispatch(rec.kernel_copy, 8 << 10, weight.clone(), key=("k",), reps=3) is first
    assert rec.copies_made == made  # a cache hit makes no copies
