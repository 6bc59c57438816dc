"""Shared by the tests of the CPU kernel ops (tests/ops/test_sparse24_cpu.py, test_sparse_unstructured.py) and of the
modules that run them (tests/nn): random weights of each layout, the tolerance rule (error vs an fp64 reference <= 2x
torch's F.linear's + atol), and the runs over every instruction set, thread count and token count this CPU has."""

from __future__ import annotations

import os
import threading
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from sparsefast._ext import NO_COMPILER_ENV, cpu_extension_error, load_cpu_extension
from sparsefast.ops.int8_rows import dequantize_int8_rows, quantize_int8_rows
from sparsefast.ops.sparse24_cpu import ISA_NAMES, best_cpu_isa

TOKENS = (1, 2, 3, 8, 11, 16, 33, 64)
SHAPES = ((1, 4), (7, 37), (13, 100), (33, 260), (64, 576))  # (out, in): 1, primes, non-multiples of 8/16
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # the stored values the kernels take


def as_stored(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored weight, its scales, the weight it stands for): `w` in `dtype`, int8 quantized per row with scales."""
    if dtype == torch.int8:
        q, scales = quantize_int8_rows(w)
        return q, scales, dequantize_int8_rows(q, scales)
    return w.to(dtype), None, w.to(dtype)


def require_cpu_kernels() -> None:
    """Skip only when the machine says it has no compiler; otherwise a missing extension is a failure."""
    if os.environ.get(NO_COMPILER_ENV) == "1":
        pytest.skip(f"{NO_COMPILER_ENV}=1: no C++ compiler, the CPU kernels are not built")
    assert load_cpu_extension(), f"CPU kernels did not build/load: {cpu_extension_error()}"


def available_isas() -> list[str]:
    return [ISA_NAMES[code] for code in range(1, best_cpu_isa() + 1)]


def random_24(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """A random 2:4 weight: 2 random kept positions per 4-group (some kept values zeroed too), any in_features."""
    groups = -(-in_features // 4)
    keep = torch.rand(out_features, groups, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(out_features, groups, 4, dtype=torch.bool).scatter_(2, keep, True)
    mask &= torch.rand(mask.shape, generator=gen) > 0.1  # groups with fewer than 2 nonzeros too
    w = torch.randn(out_features, groups * 4, generator=gen) * mask.view(out_features, -1)
    return w[:, :in_features].contiguous()


def random_unstructured(out_features: int, in_features: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_features, in_features, generator=gen)
    w[torch.rand(w.shape, generator=gen) < sparsity] = 0
    w[0] = 0  # an empty row
    if out_features > 1:
        w[-1] = torch.randn(in_features, generator=gen)  # a full row
    return w


def assert_within_rule(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    same = F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    assert y.dtype == x.dtype and y.shape == same.shape
    err = (y.double() - ref).abs().max().item()
    base = (same.double() - ref).abs().max().item()
    assert err <= 2 * base + ATOL[x.dtype], f"error {err:.3g} vs torch's {base:.3g}"


def poison(shape: tuple[int, ...]) -> None:
    """Fill and free a NaN buffer of the output's size, so an output element the kernel never writes shows up."""
    junk = torch.full(shape, float("nan"))
    del junk


def run_all(call, x_full: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    threads = torch.get_num_threads()
    try:
        for isa in available_isas():
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                for m in TOKENS:
                    x = x_full[:m]
                    poison((m, w.shape[0]))
                    y = call(x, isa)
                    assert torch.isfinite(y).all(), f"isa {isa}, {n_threads} threads, M={m}: unwritten outputs"
                    assert_within_rule(y, x, w, bias)
    finally:
        torch.set_num_threads(threads)


def assert_same_from_threads(call: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor]) -> None:
    """The serving engine calls the kernels from its own thread: results of `call` from several threads at once
    equal the main thread's, for 1 and 2 torch threads."""
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            expected = [call(x) for x in xs]
            results: dict[int, list] = {}

            def work(i: int) -> None:
                results[i] = [call(x) for x in xs for _ in range(20)][::20]

            workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
            for t in workers:
                t.start()
            for t in workers:
                t.join(timeout=60)
            assert len(results) == 3, "a thread did not finish"
            for got in results.values():
                for y, z in zip(got, expected):
                    assert torch.equal(y, z)
    finally:
        torch.set_num_threads(threads)


def opcheck_linear_op(op, packed: tuple[torch.Tensor, ...], out_features: int, in_features: int,
                      gen: torch.Generator, scales: torch.Tensor | None = None) -> None:
    """torch.library.opcheck of a CPU linear op (x, *packed, bias, out, in, isa, scales, False) on fp32 [2, 3, in] and
    bf16 [1, in] inputs: schema, fake (shape) function and dispatcher registration agree with the kernel, so
    FakeTensor tracing and torch.compile see through the op."""
    for x in (torch.randn(2, 3, in_features, generator=gen), torch.randn(1, in_features, generator=gen).bfloat16()):
        bias = torch.randn(out_features, generator=gen)
        torch.library.opcheck(op, (x, *packed, bias, out_features, in_features, 0, scales, False))
