"""CPU sparse linear kernels (2:4 and unstructured) against their torch twin, dense-with-zeros F.linear.

Tolerance rule (DESIGN.md): error vs an fp64 reference <= 2x the error of torch's F.linear in the same precision, plus
a small atol. Every vector path this CPU has (avx512, avx2) and the scalar path run, with 1 and 2 threads, on fresh
random inputs with odd shapes, every M that matters, and poisoned output memory. In CI these tests fail (not skip)
when the extension did not build; SPARSEFAST_NO_COMPILER=1 is the one way to skip them.
"""

from __future__ import annotations

import os
import threading
import zlib

import pytest
import torch
import torch.nn.functional as F

from sparsefast._ext import NO_COMPILER_ENV, cpu_extension_error, load_cpu_extension
from sparsefast.ops.sparse24_cpu import ISAS, pack_sparse24_cpu, sparse24_linear_cpu
from sparsefast.ops.sparse_unstructured import pack_sparse_unstructured, sparse_unstructured_linear_cpu

TOKENS = (1, 2, 3, 8, 16, 33, 64)
SHAPES = ((1, 4), (7, 37), (13, 100), (33, 260), (64, 576))  # (out, in): 1, primes, non-multiples of 8/16
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def require_cpu_kernels() -> None:
    """Skip only when the machine says it has no compiler; otherwise a missing extension is a failure."""
    if os.environ.get(NO_COMPILER_ENV) == "1":
        pytest.skip(f"{NO_COMPILER_ENV}=1: no C++ compiler, the CPU kernels are not built")
    assert load_cpu_extension(), f"CPU kernels did not build/load: {cpu_extension_error()}"


def available_isas() -> list[str]:
    best = int(torch.ops.sparsefast.cpu_best_isa())
    return [name for name, code in ISAS.items() if 0 < code <= best]


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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_sparse24_linear_cpu_matches_torch(shape, wdtype, xdtype):
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, wdtype, xdtype)).encode()))
    out_f, in_f = shape
    w = random_24(out_f, in_f, gen).to(wdtype)
    bias = torch.randn(out_f, generator=gen) if in_f % 2 else None
    values, meta = pack_sparse24_cpu(w)
    x = torch.randn(max(TOKENS), in_f, generator=gen).to(xdtype)
    run_all(lambda xm, isa: sparse24_linear_cpu(xm, values, meta, bias, out_f, in_f, backend="cpu", isa=isa),
            x, w, bias)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_unstructured_linear_cpu_matches_torch(sparsity, shape, wdtype):
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(zlib.crc32(repr((sparsity, shape, wdtype)).encode()))
    out_f, in_f = shape
    w = random_unstructured(out_f, in_f, sparsity, gen).to(wdtype)
    bias = torch.randn(out_f, generator=gen)
    packed = pack_sparse_unstructured(w)
    for xdtype in (torch.float32, torch.bfloat16):
        x = torch.randn(max(TOKENS), in_f, generator=gen).to(xdtype)
        run_all(lambda xm, isa: sparse_unstructured_linear_cpu(xm, *packed, bias, out_f, in_f, backend="cpu", isa=isa),
                x, w, bias)


def test_batched_leading_dims_and_strided_input():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(3)
    w = random_24(24, 48, gen)
    values, meta = pack_sparse24_cpu(w)
    x = torch.randn(2, 5, 96, generator=gen)[..., ::2]  # non-contiguous view
    y = sparse24_linear_cpu(x, values, meta, None, 24, 48, backend="cpu")
    assert y.shape == (2, 5, 24)
    assert_within_rule(y.reshape(10, 24), x.reshape(10, 48), w, None)


def test_auto_dispatch_and_forced_backend_errors():
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(4)
    w = random_unstructured(9, 40, 0.7, gen)
    packed = pack_sparse_unstructured(w)
    x16 = torch.randn(3, 40, generator=gen).half()
    y = sparse_unstructured_linear_cpu(x16, *packed, None, 9, 40)  # fp16: auto falls back to the torch twin
    assert torch.equal(y, F.linear(x16, w.half()))
    with pytest.raises(ValueError, match="CPU kernel does not support"):
        sparse_unstructured_linear_cpu(x16, *packed, None, 9, 40, backend="cpu")
    with pytest.raises(ValueError, match="features"):
        sparse_unstructured_linear_cpu(torch.randn(2, 41), *packed, None, 9, 40)
    with pytest.raises(ValueError, match="instruction set"):
        sparse_unstructured_linear_cpu(torch.randn(2, 40), *packed, None, 9, 40, isa="neon")


def test_kernels_called_from_several_threads_at_once():
    """The serving engine calls the kernels from its own thread: results from several threads at once equal the
    main thread's, for 1 and 2 torch threads and both layouts."""
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(7)
    w24, wu = random_24(200, 96, gen), random_unstructured(200, 96, 0.6, gen)
    p24, pu = pack_sparse24_cpu(w24), pack_sparse_unstructured(wu)
    xs = [torch.randn(m, 96, generator=gen) for m in (1, 3, 8, 64)]
    calls = [lambda x: sparse24_linear_cpu(x, *p24, None, 200, 96, backend="cpu"),
             lambda x: sparse_unstructured_linear_cpu(x, *pu, None, 200, 96, backend="cpu")]
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            expected = [[call(x) for x in xs] for call in calls]
            results: dict[int, list] = {}

            def work(i: int) -> None:
                results[i] = [[call(x) for x in xs for _ in range(20)][::20] for call in calls]

            workers = [threading.Thread(target=work, args=(i,)) for i in range(3)]
            for t in workers:
                t.start()
            for t in workers:
                t.join(timeout=60)
            assert len(results) == 3, "a thread did not finish"
            for got in results.values():
                for ys, zs in zip(got, expected):
                    for y, z in zip(ys, zs):
                        assert torch.equal(y, z)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["2:4", "unstructured"])
def test_ops_pass_opcheck(layout):
    """Schema, fake (shape) function and dispatcher registration agree with the kernel: FakeTensor tracing and
    torch.compile see through the ops."""
    require_cpu_kernels()
    gen = torch.Generator().manual_seed(6)
    w = random_24(24, 48, gen)
    if layout == "2:4":
        op, packed = torch.ops.sparsefast.sparse24_linear_cpu.default, pack_sparse24_cpu(w)
    else:
        op, packed = torch.ops.sparsefast.sparse_unstructured_linear_cpu.default, pack_sparse_unstructured(w)
    for x in (torch.randn(2, 3, 48, generator=gen), torch.randn(1, 48, generator=gen).bfloat16()):
        torch.library.opcheck(op, (x, *packed, torch.randn(24, generator=gen), 24, 48, 0))
