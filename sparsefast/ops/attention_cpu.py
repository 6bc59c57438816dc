"""Decode attention on the CPU: one new query token per sequence attends to its keys and values in a static KV cache,
read in place (csrc/cpu/attention_cpu.cpp).

out[b, h] = softmax over l <= positions[b] of (scale · q[b, h] · K[slots[b], h // group, l]) applied to V[slots[b],
h // group, :positions[b] + 1], group = heads / kv_heads (grouped-query attention as HF's repeat_kv). Scores, softmax
and the weighted sum are fp32; the output is rounded to q's dtype.

Why: the batched runner's decode step (sparsefast.serve.runner) attended with torch SDPA over a gathered copy of
the cache rows and a position mask, and that made the key count a dynamic dimension of the compiled graph. The op
takes the cache, the slots and the positions instead: no copy, no mask, static shapes; the compiled batch-1
SmolLM2 step runs 1.05-1.12x faster than with SDPA (2-core Xeon, bench/results/2026-12-07-cpu-decode-attention-ab.json).
With AVX-512 a task is a sequence's KV head and the query heads that read it (each key and value row read once for
the group, 16-key score reductions, vectorised softmax exponentials): over 30 layers of SmolLM2's shapes at 8
sequences, 2 threads, fp32 2.86 -> 1.96 ms per step at ~160 positions and 28.7 -> 24.3 ms at ~1000, bf16 1.2x,
against one query head per task (bench/results/2026-12-07-cpu-decode-attention-gqa-ab.txt).
"""

from __future__ import annotations

import torch

from sparsefast._ext import load_cpu_extension
from sparsefast.ops._dispatch import select_backend
from sparsefast.ops.sparse24_cpu import KERNEL_DTYPES, cpu_isa

MAX_HEAD_DIM = 512  # csrc/cpu/attention_cpu.h kMaxHeadDim


def decode_attention_fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernel takes q [B, heads, head_dim] and a cache [rows, kv_heads, max_len, head_dim], the extension
    aside: a query of the cache's dtype, device and head_dim that `cache_fits` takes. Tensor properties only, so
    torch.compile traces it."""
    return (q.dim() == 3 and q.dtype == keys.dtype and q.device == keys.device and keys.dim() == 4
            and q.shape[-1] == keys.shape[-1] and cache_fits(q.shape[1], keys))


def cache_fits(heads: int, keys: torch.Tensor) -> bool:
    """Whether the kernel takes queries of `heads` heads (in the cache's dtype) over the cache keys [rows, kv_heads,
    max_len, head_dim]: a CPU tensor of a kernel dtype (fp32 / bf16), heads a multiple of kv_heads, head_dim <=
    MAX_HEAD_DIM with unit stride."""
    return (keys.device.type == "cpu" and keys.dim() == 4 and keys.dtype in KERNEL_DTYPES
            and keys.shape[-1] <= MAX_HEAD_DIM and keys.stride(-1) == 1 and keys.shape[1] > 0
            and heads % keys.shape[1] == 0)


def decode_attention_takes(heads: int, keys: torch.Tensor) -> bool:
    """`cache_fits` and the CPU extension loaded: whether a decode step over this cache runs the kernel."""
    return cache_fits(heads, keys) and load_cpu_extension()


def decode_attention_cpu(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float, *, backend: str | None = None,
                         isa: str | None = None) -> torch.Tensor:
    """Attention of one new token per sequence. q: [B, heads, head_dim]; keys, values: the cache [rows, kv_heads,
    max_len, head_dim] (equal strides, last dimension contiguous); slots, positions: int64 [B] (the cache row of
    each sequence, and its new token's position: keys 0..positions[b] are read). Returns [B, heads, head_dim] in
    q's dtype. backend: auto | cpu | torch (env SPARSEFAST_BACKEND); isa (cpu backend): auto | avx512vbmi | avx512 |
    avx2 | scalar (env SPARSEFAST_CPU_ISA; avx512 and avx512vbmi run the grouped AVX-512 path when head_dim % 16
    == 0, else the AVX2 one). Threads: torch.get_num_threads()."""
    if q.dim() != 3 or keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"decode_attention_cpu: q must be [B, heads, head_dim] and keys, values the cache [rows, "
                         f"kv_heads, max_len, head_dim]; got q {tuple(q.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}")
    if keys.shape[1] == 0 or q.shape[1] % keys.shape[1]:
        raise ValueError(f"decode_attention_cpu: {q.shape[1]} query heads are not a multiple of the cache's "
                         f"{keys.shape[1]} KV heads")
    chosen = select_backend("decode_attention_cpu", q, backend, has=("cpu", "torch"),
                            cuda_ok=decode_attention_fits(q, keys) and values.stride() == keys.stride())
    if chosen == "torch":
        return decode_attention_ref(q, keys, values, slots, positions, scale)
    return torch.ops.sparsefast.decode_attention_cpu(q, keys, values, slots.reshape(-1), positions.reshape(-1),
                                                     float(scale), cpu_isa(isa))


def decode_attention_ref(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch twin, one sequence at a time in fp32: the sequence's cache rows up to its position, each KV head
    repeated for its group of query heads, softmax(scale · q Kᵀ) V, rounded to q's dtype."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    out = []
    for b, (slot, pos) in enumerate(zip(slots.reshape(-1).tolist(), positions.reshape(-1).tolist())):
        k = keys[slot, :, :pos + 1].float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, L, D]
        v = values[slot, :, :pos + 1].float().repeat_interleave(heads // kv_heads, dim=0)
        weights = torch.softmax(torch.einsum("hd,hld->hl", q[b].float(), k) * scale, dim=-1)
        out.append(torch.einsum("hl,hld->hd", weights, v))
    return torch.stack(out).to(q.dtype)
