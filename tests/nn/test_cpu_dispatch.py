"""The CPU dispatch calibration times both candidates from DRAM: each rotates through distinct copies of its weight
that together exceed the last-level cache (here monkeypatched small), and frees them afterwards."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsefast.nn import SparseLinear, choose_sparse_layer, cpu_dispatch
from sparsefast.nn.cpu_dispatch import (
    COLD_FOOTPRINT_LLC,
    COLD_MAX_BYTES,
    LLC_FALLBACK_BYTES,
    calibrate_cpu_dispatch,
    clear_calibration_cache,
    cold_copies,
    last_level_cache_bytes,
)

LLC = 64 << 10  # the monkeypatched last-level cache: 8 copies of a 32 x 64 fp32 weight (8 KiB) fill it


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_calibration_cache()
    yield
    clear_calibration_cache()


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

    def dense_linear(self, real_linear):
        def linear(x, w, b=None):
            self.dense_ptrs.append(w.data_ptr())
            if w is not self.weight:
                self.refs.append(weakref.ref(w))
            return real_linear(x, w, b)
        return linear


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
    monkeypatch.setattr(cpu_dispatch, "last_level_cache_bytes", lambda: LLC)
    weight = torch.randn(32, 64)
    copy_bytes = weight.numel() * weight.element_size()
    rec = _Recorder(weight)
    monkeypatch.setattr(torch.nn.functional, "linear", rec.dense_linear(torch.nn.functional.linear))
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
    monkeypatch.setattr(cpu_dispatch, "last_level_cache_bytes", lambda: LLC)
    weight = torch.randn(32, 64)
    rec = _Recorder(weight)
    first = calibrate_cpu_dispatch(rec.kernel_copy, 8 << 10, weight, key=("k",), reps=3)
    made = rec.copies_made
    assert calibrate_cpu_dispatch(rec.kernel_copy, 8 << 10, weight.clone(), key=("k",), reps=3) is first
    assert rec.copies_made == made  # a cache hit makes no copies


@pytest.mark.parametrize("sparsity", [None, 0.7])
def test_choose_sparse_layer_gives_the_calibration_new_packed_copies(monkeypatch, sparsity):
    """choose_sparse_layer's kernel_copy makes a new layer over new packed tensors each call, of kernel_bytes,
    computing the same linear."""
    from sparsefast.ops.sparse24 import to_sparse24_by_magnitude

    torch.manual_seed(3)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        if sparsity is None:
            lin.weight.copy_(to_sparse24_by_magnitude(lin.weight))
        else:
            lin.weight[torch.rand(lin.weight.shape) < sparsity] = 0
    seen: dict[str, list] = {}
    created: list[SparseLinear] = []
    init = SparseLinear.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        created.append(self)

    monkeypatch.setattr(SparseLinear, "__init__", recording_init)

    def spy(kernel_copy, kernel_bytes, dense_weight, *, key):
        before = len(created)
        kernels = [kernel_copy() for _ in range(3)]
        layers = created[before:]  # the layer each kernel_copy() made
        assert len(layers) == 3
        ptrs = {t.data_ptr() for m in layers for t in m.packed()}
        assert len(ptrs) == 3 * len(layers[0].packed())  # every copy's tensors are its own
        assert kernel_bytes == sum(t.numel() * t.element_size() for t in layers[0].packed())
        x = torch.randn(3, 64)
        for k in kernels:
            torch.testing.assert_close(k(x), F.linear(x, dense_weight, lin.bias.detach()), atol=1e-4, rtol=1e-4)
        seen[key[2]] = layers
        return cpu_dispatch.DEFAULT_CPU_DISPATCH, {m: {"kernel_ms": 1.0, "dense_ms": 2.0} for m in (1, 4)}

    monkeypatch.setattr("sparsefast.nn.sparse_linear.calibrate_cpu_dispatch", spy)
    layer, record = choose_sparse_layer(lin)
    assert set(seen) == ({"2:4", "unstructured"} if sparsity is None else {"unstructured"})
    assert isinstance(layer, SparseLinear) and record["chosen"] in seen
