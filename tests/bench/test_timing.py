"""sparsefast.bench.timing without CUDA: the median of perf_counter-timed calls (quick mode)."""

from __future__ import annotations

import time

import pytest
import torch

from sparsefast.bench.timing import time_ms, time_once_s


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (CUDA times with triton's do_bench)")
def test_cpu_timings_are_medians_of_real_calls():
    delays = iter([0.0, 0.15, 0.0])  # median ~0 ms; the mean would be 50 ms, the max 150 ms
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    ms = time_ms(fn, cpu_calls=3, untimed_calls=5)  # untimed calls are a CUDA warm-up: none here
    assert len(calls) == 3 and 0 <= ms < 25  # the median ignores the one slow call (a mean would not)
    assert time_once_s(lambda: time.sleep(0.01)) >= 0.01
