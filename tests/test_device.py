"""sparsefast.device: device and dtype names as users type them → torch objects, with clear errors."""

from __future__ import annotations

import os

import pytest
import torch

from sparsefast.device import resolve_device, resolve_dtype


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
    assert resolve_dtype("auto") is None and resolve_dtype(None) is None
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8")


def test_parse_threads():
    from sparsefast.device import parse_threads

    assert parse_threads("auto") is None and parse_threads(" AUTO ") is None
    assert parse_threads("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(ValueError, match="--threads auto"):
            parse_threads(bad)


def _fake_stat(monkeypatch, busy_by_cpu: dict[int, float], allowed: set[int]):
    """/proc/stat read twice: cpu c spends busy_by_cpu[c] of 100 jiffies busy between the reads."""
    from sparsefast import device

    reads = iter([{c: (0, 0) for c in busy_by_cpu},
                  {c: (round(100 * f), 100) for c, f in busy_by_cpu.items()}])
    monkeypatch.setattr(device, "_cpu_times", lambda: next(reads))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: allowed)
    monkeypatch.setattr(device, "_cgroup_cpu_quota", lambda: None)


def test_free_cpu_cores_leaves_out_busy_cores(monkeypatch):
    from sparsefast.device import free_cpu_cores

    _fake_stat(monkeypatch, {0: 0.05, 1: 0.98, 2: 0.3, 3: 0.9}, {0, 1, 2, 3})
    assert free_cpu_cores(window_s=0) == 2
    _fake_stat(monkeypatch, {0: 0.05, 1: 0.98, 2: 0.3, 3: 0.9}, {1, 2})  # affinity: only cores 1 and 2
    assert free_cpu_cores(window_s=0) == 1
    _fake_stat(monkeypatch, {0: 1.0, 1: 1.0}, {0, 1})  # every core busy: still one thread
    assert free_cpu_cores(window_s=0) == 1


def test_free_cpu_cores_respects_cgroup_quota(monkeypatch):
    from sparsefast import device

    _fake_stat(monkeypatch, {c: 0.0 for c in range(8)}, set(range(8)))
    monkeypatch.setattr(device, "_cgroup_cpu_quota", lambda: 3)
    assert device.free_cpu_cores(window_s=0) == 3


def test_free_cpu_cores_sees_a_real_busy_process():
    """A busy loop pinned to one of this process's cores takes that core out (needs 2+ cores)."""
    import subprocess
    import sys
    import time

    from sparsefast.device import free_cpu_cores

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores")
    quiet = free_cpu_cores()
    code = f"import os\nos.sched_setaffinity(0, {{{allowed[-1]}}})\nwhile True: pass"
    spin = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.3)
        busy = free_cpu_cores()
    finally:
        spin.kill()
        spin.wait()
    assert busy == quiet - 1 or busy == 1, (quiet, busy)
