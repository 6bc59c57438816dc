"""GPU tests of the 2:4 CUDA kernels (decode and mma.sp GEMM) against fp64 / cuBLAS references.

Self-diagnosing order: (1) the one-warp probe maps every single kept value of a 16x64 block to where the tensor
core used it and names the broken part (values fragment order, row halves, metadata nibble/word/k-tile order);
(2) exact small-integer problems on ragged shapes print which row blocks / tokens / splits are wrong;
(3) LLaMA shapes with the DESIGN.md 2x rule; (4) opcheck. Run with -s to see the diagnostics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bench.shapes import all_shapes
from sparsefast._ext import load_extension
from sparsefast.ops.sparse24 import DECODE_MAX_M, pack_sparse24, sparse24_matmul, to_sparse24_by_magnitude

pytestmark = [pytest.mark.gpu, pytest.mark.cuda_ext,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.float16, torch.bfloat16]
M_ALL = [1, 2, 3, 4, 8, 16, 32, 64, 128, 512, 2048, 4096]
LARGE_M_SHAPES = {("llama-7b", "qkvo_proj"), ("llama-70b", "kv_proj"), ("llama-13b", "down_proj")}


@pytest.fixture(scope="module")
def ext():
    mod = load_extension()
    if mod is None:
        from sparsefast._ext import extension_error

        pytest.skip(f"sparsefast._C not built: {extension_error()}")
    return mod


def _poison_then(fn, shape, dtype):
    """Fill a freed block of the output's size with NaN so an unwritten output element shows up."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    return fn()


def _describe(y: torch.Tensor, ref: torch.Tensor, tol: float = 0.0) -> str:
    bad = ~((y.double() - ref).abs() <= tol)
    if not bad.any():
        return "ok"
    tok, row = bad.nonzero(as_tuple=True)
    return (f"{int(bad.sum())}/{bad.numel()} wrong ({int(torch.isnan(y).sum())} NaN = unwritten); "
            f"row blocks (16) {sorted(set((row // 16).tolist()))[:12]}, row CTAs (128) "
            f"{sorted(set((row // 128).tolist()))[:12]}, token slices (8) {sorted(set((tok // 8).tolist()))[:12]}, "
            f"first (token,row) {(int(tok[0]), int(row[0]))}: got {float(y[tok[0], row[0]])} "
            f"want {float(ref[tok[0], row[0]])}")


def _probe_map(ext, dtype) -> list[tuple[int, int, int, int]]:
    """For every (row, col) of a 16x64 block: one kept value 1 at (row, col); x[0, k] = k + 1, x[1, k] = 1.
    Returns [(row, col, row_seen, col_seen)] where they differ (col_seen = -1: value lost)."""
    x = torch.zeros(8, 64, dtype=dtype)
    x[0] = torch.arange(1, 65)
    x[1] = 1
    xc = x.cuda()
    wrong = []
    for r in range(16):
        for c in range(64):
            w = torch.zeros(16, 64, dtype=dtype)
            w[r, c] = 1
            values, meta = pack_sparse24(w)
            out = ext.sparse24_probe_tile(values.cuda(), meta.cuda(), xc).cpu()  # [8 tokens, 16 rows]
            rows = (out[1] != 0).nonzero().flatten().tolist()
            seen = (rows[0], int(out[0, rows[0]]) - 1) if len(rows) == 1 and out[1, rows[0]] == 1 else (-1, -1)
            if seen != (r, c):
                wrong.append((r, c, *seen))
    return wrong


def _diagnose(wrong) -> str:
    if not wrong:
        return "ok"
    lines = [f"{len(wrong)}/1024 single values land wrong; first: " + ", ".join(
        f"(r{r},c{c})->(r{rs},c{cs})" for r, c, rs, cs in wrong[:8])]
    lost = sum(1 for w in wrong if w[2] < 0)
    if lost:
        lines.append(f"{lost} values lost or duplicated: values fragment order (a0..a7 per lane) or metadata invalid")
    if all(w[1] >= 32 for w in wrong):
        lines.append("only k tile 1 wrong: metadata word for h=1 (lane ^ 2 shuffle) or values tile 1 offset")
    if all(w[0] >= 8 for w in wrong):
        lines.append("only rows 8..15 wrong: row-half (bits 31:16 / a2,a3,a6,a7) mapping")
    same_group = [w for w in wrong if w[2] == w[0] and w[3] // 4 == w[1] // 4]
    if same_group and len(same_group) == len(wrong):
        lines.append("right group, wrong position: nibble bit order (i0 in bits 1:0, i1 in bits 3:2) or slot order")
    other = [w for w in wrong if w[2] == w[0] and w[3] >= 0 and w[3] // 4 != w[1] // 4]
    if other:
        lines.append(f"{len(other)} land in another group of the same row: nibble/word order within the metadata")
    return "\n".join(lines)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_single_values(ext, dtype):
    wrong = _probe_map(ext, dtype)
    report = _diagnose(wrong)
    print(f"\n[probe {dtype}] {report}")
    assert not wrong, report


def _int_problem(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = to_sparse24_by_magnitude(torch.randint(-2, 3, (n, k), generator=g).to(dtype) +
                                 torch.rand(n, k, generator=g).to(dtype) * 0.25).round()
    w = w.clamp(-1, 1)
    x = torch.randint(-1, 2, (m, k), generator=g).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,ms", [("decode", [1, 3, 8, 9, 16, 17, 32]), ("gemm", [1, 33, 130, 257]),
                                       ("gemm_v1", [1, 33, 130])])
@pytest.mark.parametrize("n,k", [(40, 136), (300, 1032), (1024, 8192)])
def test_exact_small_integers(ext, dtype, kernel, ms, n, k):
    """Integer inputs make the fp32 result exact: any difference is a bug, described by tile position."""
    problems = []
    for m in ms:
        x, w = _int_problem(m, n, k, dtype, seed=m + n)
        values, meta = pack_sparse24(w)
        # fp32 accumulation of small integers is exact; the one rounding is to the output dtype (bf16 cannot hold
        # e.g. 271), so the reference is the exact product rounded the same way.
        ref = (x.double() @ w.double().T).to(dtype).double()
        xc, vc, mc = x.cuda(), values.cuda(), meta.cuda()
        y = _poison_then(lambda: sparse24_matmul(xc, vc, mc, n, k, backend="cuda", kernel=kernel), (m, n), dtype)
        msg = _describe(y.cpu(), ref)
        if kernel == "decode":
            plan = ext.sparse24_decode_plan(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            msg += f" [plan row_ctas={plan[0]} splits={plan[1]} chunks/split={plan[2]}]"
        if kernel == "gemm":
            plan = ext.sparse24_gemm_plan(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            msg += f" [plan config={plan[0]} splits={plan[1]} chunks/split={plan[2]}]"
        print(f"\n[{kernel} {dtype} M={m} N={n} K={k}] {msg}")
        if not msg.startswith("ok"):
            problems.append(f"M={m}: {msg}")
    assert not problems, "\n".join(problems)


def test_decode_is_deterministic_and_agrees_with_gemm(ext):
    x, w = torch.randn(16, 4096, dtype=torch.float16), to_sparse24_by_magnitude(torch.randn(1024, 4096)).half()
    values, meta = (t.cuda() for t in pack_sparse24(w))
    xc = x.cuda()
    y1 = sparse24_matmul(xc, values, meta, 1024, 4096, kernel="decode")
    y2 = sparse24_matmul(xc, values, meta, 1024, 4096, kernel="decode")
    y3 = sparse24_matmul(xc, values, meta, 1024, 4096, kernel="gemm")
    assert torch.equal(y1, y2), "split-K decode must be bitwise deterministic"
    # different summation orders: at most a rounding step of the fp16 output apart (2^-10 relative)
    assert ((y1.float() - y3.float()).abs() <= y3.float().abs() * 2.0**-10 + 1e-3).all()


_W_CACHE: dict = {}


def _layer(n, k, dtype):
    key = (n, k, dtype)
    if key not in _W_CACHE:
        _W_CACHE.clear()
        g = torch.Generator(device="cuda").manual_seed(n * 31 + k)
        w = to_sparse24_by_magnitude(torch.randn(n, k, device="cuda", generator=g) * (2.0 / k) ** 0.5).to(dtype)
        _W_CACHE[key] = (w, *pack_sparse24(w))
    return _W_CACHE[key]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("model,name,n,k", all_shapes(), ids=[f"{m}-{s}" for m, s, _, _ in all_shapes()])
def test_llama_shapes_2x_rule(ext, model, name, n, k, dtype):
    """error vs fp64 <= 2 x error of torch (cuBLAS) in the same precision + atol, for every M."""
    w, values, meta = _layer(n, k, dtype)
    atol = 1e-3 if dtype == torch.float16 else 8e-3
    ms = M_ALL if (model, name) in LARGE_M_SHAPES else [m for m in M_ALL if m <= 128]
    w64 = w.double()
    fails = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ w64.T
        err_t = (torch.nn.functional.linear(x, w).double() - ref).abs().max().item()
        y = _poison_then(lambda: sparse24_matmul(x, values, meta, n, k, backend="cuda"), (m, n), dtype)
        err_k = (y.double() - ref).abs().max().item()
        kern = "decode" if m <= DECODE_MAX_M else "gemm"
        line = f"M={m} {kern}: err {err_k:.3e} torch {err_t:.3e} ratio {err_k / max(err_t, 1e-12):.2f}"
        print(f"\n[{model} {name} {n}x{k} {dtype}] {line}")
        if not (err_k <= 2 * err_t + atol):  # NaN fails too
            fails.append(line + " :: " + _describe(y, ref, tol=2 * err_t + atol))
    assert not fails, "\n".join(fails)


@pytest.mark.parametrize("kernel", [1, 2, 3])
def test_opcheck(ext, kernel):
    w = to_sparse24_by_magnitude(torch.randn(48, 128)).half()
    values, meta = (t.cuda() for t in pack_sparse24(w))
    x = torch.randn(5, 128, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.sparsefast.sparse24_matmul.default, (x, values, meta, 48, 128, kernel))


_BAD_INPUTS_SCRIPT = """
import torch
from bench.shapes import all_shapes
from sparsefast._ext import load_extension
from sparsefast.ops.sparse24 import pack_sparse24, to_sparse24_by_magnitude
ext = load_extension()
w = to_sparse24_by_magnitude(torch.randn(32, 64)).half()
values, meta = (t.cuda() for t in pack_sparse24(w))
x = torch.randn(3, 64, dtype=torch.float16, device="cuda")
cases = [
    ("dtype", lambda: ext.sparse24_matmul(x.bfloat16(), values, meta, 32, 64, 0)),
    ("values must be", lambda: ext.sparse24_matmul(x, values[:1].contiguous(), meta, 32, 64, 0)),
    ("decode kernel takes", lambda: ext.sparse24_matmul(torch.randn(33, 64, dtype=torch.float16, device="cuda"),
                                                        values, meta, 32, 64, 1)),
    ("kernel must be", lambda: ext.sparse24_matmul(x, values, meta, 32, 64, 7)),
    ("CUDA tensors", lambda: ext.sparse24_matmul(x.cpu(), values, meta, 32, 64, 0)),
]
for want, call in cases:
    try:
        call()
    except ValueError as exc:
        assert want in str(exc), (want, str(exc))
        print("rejected:", want, flush=True)
    else:
        raise SystemExit(f"not rejected: {want}")
print("ALL REJECTED")
"""


def test_binding_rejects_bad_inputs(ext):
    """In a subprocess: the first GPU run segfaulted here (c10::Error thrown through a module whose C++ runtime
    differs from libc10's), and a crash must not take the other tests' results with it."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BAD_INPUTS_SCRIPT], capture_output=True,
                          text=True, timeout=300, env=env, cwd=root)
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.returncode == 0 and "ALL REJECTED" in proc.stdout, (
        f"rc={proc.returncode} (negative = killed by that signal)\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
