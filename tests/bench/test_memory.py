"""sparsefast.bench.memory: bytes, GB/s and the measured bandwidth ceilings (on small CPU buffers)."""

from __future__ import annotations

import torch

from sparsefast.bench.memory import copy_bandwidth_gbs, gbs, memory_bandwidth, peak_rss_bytes, tensor_bytes


def test_bytes_and_gbs():
    assert tensor_bytes(torch.zeros(3, 5), torch.zeros(7, dtype=torch.bfloat16)) == 3 * 5 * 4 + 7 * 2
    assert gbs(2 * 10**9, 1000.0) == 2.0


def test_bandwidths_are_measured():
    assert copy_bandwidth_gbs("cpu", nbytes=1 << 20) > 0
    bw = memory_bandwidth(torch.device("cpu"), nbytes=1 << 20, reps=2)
    assert bw["copy_gbs"] > 0 and bw["read_gbs"] > 0 and bw["buffer_bytes"] == 1 << 20
    assert peak_rss_bytes() > 10 * 2**20  # a process with torch loaded
