"""Preallocated KV cache with static slots (gpt-fast's static cache, one slot per concurrent request).

Layer l holds keys and values of shape [rows, kv_heads_l, max_model_len, head_dim]: the head count is read per layer,
so structurally pruned models with a different number of KV heads in each layer need nothing special. rows is
max_batch, plus one with `spare_row=True`, a row that belongs to no request: the compiled decode step
(sparsefast.serve.compiled) pads a batch to its bucket with rows that write and read there, so padding never touches
a request's keys.
"""

from __future__ import annotations

import torch


class SlotAllocator:
    """Free list of slot indices; always hands out the lowest free slot so running slots stay contiguous (the
    attention then reads a view of the cache instead of gathering rows)."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))

    def acquire(self) -> int:
        if not self.free:
            raise RuntimeError("no free KV slot (the scheduler admits at most max_batch requests)")
        return self.free.pop(0)

    def release(self, slot: int) -> None:
        if slot in self.free:
            raise RuntimeError(f"KV slot {slot} released twice")
        self.free.append(slot)
        self.free.sort()


class StaticKVCache:
    """keys[l], values[l]: [max_batch (+ 1 with spare_row), kv_heads[l], max_len, head_dim] tensors of `dtype` on
    `device`. Rows 0..max_batch-1 are the request slots; `spare_row_index` (max_batch, or None) is the padding row."""

    def __init__(self, kv_heads: list[int], head_dim: int, max_batch: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device, spare_row: bool = False) -> None:
        self.max_batch, self.max_len, self.head_dim = max_batch, max_len, head_dim
        self.spare_row_index = max_batch if spare_row else None
        shapes = [(max_batch + int(spare_row), h, max_len, head_dim) for h in kv_heads]
        self.keys = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.values = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, kv_heads, T, head_dim] for rows `slots` [B] at positions [B, T]."""
        rows = slots[:, None].expand_as(positions)
        # cache[rows, :, positions] has shape [B, T, kv_heads, head_dim]
        self.keys[layer][rows, :, positions] = k.transpose(1, 2)
        self.values[layer][rows, :, positions] = v.transpose(1, 2)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` to row `dst` in every layer (n samples of one prompt: the
        prompt is prefilled once)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]

    def read(self, layer: int, slots: torch.Tensor, first: int | None, length: int) -> tuple[torch.Tensor, ...]:
        """Keys and values [B, kv_heads, length, head_dim] of `slots`. `first` = slots[0] when the slots are the
        contiguous range first..first+B-1: then a view, else a gathered copy."""
        k, v = self.keys[layer], self.values[layer]
        if first is not None:
            b = slots.numel()
            return k[first:first + b, :, :length], v[first:first + b, :, :length]
        return k[slots, :, :length], v[slots, :, :length]
