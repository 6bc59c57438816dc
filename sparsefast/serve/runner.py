"""Model runners: one forward over the engine's current batch, with the KV cache kept between steps.

* `LlamaBatchRunner` (LLaMA / Mistral / Qwen2 layout, which includes SmolLM2): runs the model's own modules —
  embeddings, norms, rotary embedding, q/k/v/o projections, MLP, head — so any linear swapped into the model (a
  Sparse24Linear, a CPU sparse linear) is what runs. Attention is ours, over a `StaticKVCache`, so rows of
  different lengths decode together in one batched forward: a decode step on the CPU runs the decode-attention
  kernel (sparsefast.ops.attention_cpu: each row's cache entries up to its position, read in place); prefill, and
  decode where the kernel does not take every layer (CUDA, no CPU extension, a dtype other than fp32/bf16, heads
  over 512 wide), run torch SDPA with a per-row position mask.
  Head counts are read per layer from the projection widths (structural checkpoints keep different counts per
  layer). The projections that read the same input run as one call where they can (q/k/v; gate/up of the gated
  MLP): `fuse_linears` concatenates their weights and re-points the model's own tensors to rows of the fused buffer
  (views, no extra memory, the model's forward and state dict unchanged).
* `HFRequestRunner` (every other family, e.g. OPT, GPT-NeoX): the HF forward with one HF cache per request, one
  forward per request per step. Requests still join and leave at step boundaries, but their matmuls are not batched.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from sparsefast.models import LlamaAdapter, get_adapter
from sparsefast.models.loading import cache_argument, returned_cache
from sparsefast.nn.dense_linear import DenseCpuLinear
from sparsefast.nn.fused_linear import fuse_linears
from sparsefast.ops.attention_cpu import decode_attention_takes
from sparsefast.ops.dense_cpu import dense_kernel_fits
from sparsefast.ops.sparse24_cpu import cpu_isa
from sparsefast.serve.compiled import CompiledRunner, check_compile_mode
from sparsefast.serve.kv_cache import StaticKVCache

_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)), which the runner computes itself with
# gate and up fused
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
# (layer, q, k, v, scale) -> attention output [B, heads, T, head_dim]: stores a step's keys and values
# [B, kv_heads, T, head_dim] in the cache and attends q [B, heads, T, head_dim] to what the rows see
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
log = logging.getLogger(__name__)


def _sliding_window(config) -> int | None:
    """The attention window the model was trained with, when its layers use one (Mistral; Qwen2 with
    use_sliding_window), else None."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window) if window else None


def batched_runner_supported(model: nn.Module, max_len: int) -> bool:
    """True when `LlamaBatchRunner` computes exactly what the model's own forward computes for this context."""
    if not isinstance(get_adapter(model), LlamaAdapter):
        return False
    window = _sliding_window(model.config)
    if window is not None and window < max_len:
        return False
    layers = get_adapter(model).decoder_layers(model)
    attn = [getattr(layer, "self_attn", None) for layer in layers]
    return all(a is not None and all(hasattr(a, p) for p in _ATTN_PARTS) and hasattr(a, "head_dim")
               and not hasattr(a, "q_norm") for a in attn)


class LlamaBatchRunner:
    """Batched prefill/decode for the LLaMA layout over a static per-slot KV cache.

    Args: model (eval mode, on `device`), max_batch slots, max_len positions per slot; spare_row: one more cache row
    that belongs to no slot, where the compiled step's padding rows go (sparsefast.serve.kv_cache).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, device: torch.device, *,
                 spare_row: bool = False) -> None:
        adapter = get_adapter(model)
        self.model, self.device = model, device
        self.layers = adapter.decoder_layers(model)
        self.embed = model.get_input_embeddings()
        self.norm = adapter.final_norm(model)
        self.head = adapter.lm_head(model)
        self.rotary = adapter.rotary_embedding(model)
        self.head_dim = int(self.layers[0].self_attn.head_dim)
        self.kv_heads = [layer.self_attn.k_proj.out_features // self.head_dim for layer in self.layers]
        self.qkv = [fuse_linears([a.q_proj, a.k_proj, a.v_proj]) for a in (layer.self_attn for layer in self.layers)]
        self.gate_up = [fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj])
                        if type(layer.mlp).__name__ in _GATED_MLPS else None for layer in self.layers]
        dtype = self.embed.weight.dtype
        self.cache = StaticKVCache(self.kv_heads, self.head_dim, max_batch, max_len, dtype=dtype, device=device,
                                   spare_row=spare_row)
        # decode attends with the CPU kernel when it takes every layer's heads (decided once: the compiled step
        # reads it), else with SDPA
        self.decode_kernel = all(decode_attention_takes(layer.self_attn.q_proj.out_features // self.head_dim, keys)
                                 for layer, keys in zip(self.layers, self.cache.keys))
        self.isa = cpu_isa() if self.decode_kernel else None

    def prefill(self, slots: list[int], prompts: list[list[int]], *,
                all_positions: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run each prompt into its slot (positions 0..len-1) in one forward; logits [n, vocab] of each prompt's
        last position, or with all_positions the logits of every position of each prompt ([len_i, vocab] each: row
        t is the distribution of the token after prompt token t; prompt logprobs). Shorter prompts are right-padded:
        causal attention keeps the padding out of their real positions, and what it writes to the cache past a
        prompt's end is masked, then overwritten, by its decode."""
        longest = max(map(len, prompts))
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=self.device)
        pos = torch.arange(longest, device=self.device)[None].expand(len(prompts), -1)
        if all_positions:
            logits = self._forward(ids, slots, pos, causal_from_zero=True, all_positions=True)
            return [row[:len(p)] for row, p in zip(logits, prompts)]
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._forward(ids, slots, pos, causal_from_zero=True, last=last)

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        """One new token per slot (ids[b] at positions[b]); logits [B, vocab]."""
        tokens = torch.tensor(ids, device=self.device)[:, None]
        return self._forward(tokens, slots, torch.tensor(positions, device=self.device)[:, None],
                             uniform=len(set(positions)) == 1)

    def decode_static(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
        """The decode step as sparsefast.serve.compiled captures it: tensors in, tensors out, no value read back
        to Python, so the shapes of the arguments are the only thing a compiled graph depends on.

        ids, positions: [B, 1] long; slots: [B] long, distinct cache rows (a padding row may repeat the spare row);
        mask: None with `decode_kernel` (the kernel reads keys 0..positions[b] of each row), else [B, 1, 1, L] bool,
        key k visible to row b iff k <= positions[b] (L = the keys read, at least max(positions) + 1). Returns
        logits [B, vocab]."""
        if mask is None:
            return self._run(ids, positions, self._decode_attend(slots, positions))
        length = mask.shape[-1]

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.cache.write(li, slots, positions, k, v)
            keys, values = self.cache.read(li, slots, None, length)
            return _sdpa(q, keys, values, mask, False, scale)

        return self._run(ids, positions, attend)

    def _decode_attend(self, slots: torch.Tensor, positions: torch.Tensor) -> Attend:
        """Attention of a decode step (one token per row) through the CPU kernel: the cache rows `slots` [B] read in
        place up to each row's position (positions [B, 1])."""
        flat, op = positions.reshape(-1), torch.ops.sparsefast.decode_attention_cpu.default

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.cache.write(li, slots, positions, k, v)
            out = op(q[:, :, 0], self.cache.keys[li], self.cache.values[li], slots, flat, scale, self.isa)
            return out[:, :, None]

        return attend

    def release(self, slot: int) -> None:
        """Nothing to free: a slot's stale keys are masked out (positions beyond the new owner's length)."""

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Give slot `dst` the keys and values of slot `src`'s first `length` positions (a shared prefill)."""
        self.cache.copy_slot(src, dst, length)

    def _forward(self, ids: torch.Tensor, slots: list[int], positions: torch.Tensor, *,
                 causal_from_zero: bool = False, uniform: bool = False, last: torch.Tensor | None = None,
                 all_positions: bool = False) -> torch.Tensor:
        """The eager step. ids, positions: [B, T] (long); returns logits [B, vocab] at column `last` [B] of each row
        (default the final column), or [B, T, vocab] at every column with all_positions."""
        b = ids.shape[0]
        slot_t = torch.tensor(slots, device=self.device)
        if self.decode_kernel and ids.shape[1] == 1 and not causal_from_zero and last is None and not all_positions:
            return self._run(ids, positions, self._decode_attend(slot_t, positions))
        length = int(positions.max()) + 1
        first = slots[0] if slots == list(range(slots[0], slots[0] + b)) else None
        if causal_from_zero or uniform:
            mask = None  # prefill from position 0 (is_causal) or every row sees all `length` keys
        else:
            keys = torch.arange(length, device=self.device)
            mask = (keys[None, None, None, :] <= positions[:, None, :, None])  # [B, 1, T, length]

        def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self.cache.write(li, slot_t, positions, k, v)
            if causal_from_zero:  # prefill from 0: the prompt's own keys are the whole context
                return _sdpa(q, k, v, None, True, scale)
            keys, values = self.cache.read(li, slot_t, first, length)
            return _sdpa(q, keys, values, mask, False, scale)

        return self._run(ids, positions, attend, last=last, all_positions=all_positions)

    def _run(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, *, last: torch.Tensor | None = None,
             all_positions: bool = False) -> torch.Tensor:
        """Embedding, every decoder layer, final norm and head; attend(layer, q, k, v, scale) stores this step's keys
        and values and returns the attention output. Logits [B, vocab] of column `last` (default -1), or
        [B, T, vocab] of every column with all_positions."""
        b = ids.shape[0]
        hidden = self.embed(ids)
        cos_sin = self.rotary(hidden, positions)
        for li, layer in enumerate(self.layers):
            x = layer.input_layernorm(hidden)
            hidden = hidden + self._attention(layer.self_attn, li, x, cos_sin, attend)
            hidden = hidden + self._mlp(layer.mlp, li, layer.post_attention_layernorm(hidden))
        if all_positions:
            return self.head(hidden if self.norm is None else self.norm(hidden))
        rows = hidden[:, -1] if last is None else hidden[torch.arange(b, device=self.device), last]
        if self.norm is not None:
            rows = self.norm(rows)
        if b > 1 and self._head_as_mm(rows):
            # [vocab, hidden] @ [hidden, B]: for a few rows MKL runs this ~2x faster than F.linear's x @ Wᵀ on CPU
            # (the head is the largest matrix of a small model)
            return torch.mm(self.head.weight, rows.t()).t()
        return self.head(rows)

    def _head_as_mm(self, rows: torch.Tensor) -> bool:
        """Whether the head runs as torch.mm: a bias-free dense head (nn.Linear, or a DenseCpuLinear for the M where
        it would run F.linear rather than the dense CPU kernel)."""
        if type(self.head) is DenseCpuLinear:
            return self.head.bias is None and not dense_kernel_fits(rows, self.head.weight)
        return type(self.head) is nn.Linear and self.head.bias is None

    def _attention(self, attn: nn.Module, li: int, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                   attend: Attend) -> torch.Tensor:
        b, t, _ = x.shape
        fused = self.qkv[li]
        if fused is None:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        else:
            q, k, v = fused(x).split([attn.q_proj.out_features, attn.k_proj.out_features,
                                      attn.v_proj.out_features], -1)
        q = q.reshape(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        out = attend(li, q, k, v, attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))


    def _mlp(self, mlp: nn.Module, li: int, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up[li]
        if fused is None:
            return mlp(x)
        gate, up = fused(x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
        return mlp.down_proj(mlp.act_fn(gate) * up)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
          scale: float) -> torch.Tensor:
    """torch SDPA of q [B, heads, T, D] over keys, values [B, kv_heads, L, D] (grouped-query when the counts
    differ)."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and q.shape[2] > 1,
                                          scale=scale, enable_gqa=q.shape[1] != keys.shape[1])


class HFRequestRunner:
    """Per-request decoding through the model's own HF forward and cache (families without a batched runner)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, device: torch.device) -> None:
        self.model, self.device = model, device
        self.caches: list = [None] * max_batch
        self.cache_argument = cache_argument(model)

    def _step(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] of the new positions."""
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True,
                         **{self.cache_argument: self.caches[slot]})
        self.caches[slot] = returned_cache(out)
        return out.logits[0]

    def prefill(self, slots: list[int], prompts: list[list[int]], *,
                all_positions: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """As LlamaBatchRunner.prefill."""
        for slot in slots:
            self.caches[slot] = None
        logits = [self._step(s, p) for s, p in zip(slots, prompts)]
        return logits if all_positions else torch.stack([row[-1] for row in logits])

    def decode(self, slots: list[int], ids: list[int], positions: list[int]) -> torch.Tensor:
        return torch.stack([self._step(s, [i])[-1] for s, i in zip(slots, ids)])

    def release(self, slot: int) -> None:
        self.caches[slot] = None

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """As LlamaBatchRunner.copy_slot: `dst` gets its own copy of `src`'s cache (which holds `length`
        positions)."""
        self.caches[dst] = copy.deepcopy(self.caches[src])


def make_runner(model: nn.Module, max_batch: int, max_len: int, device: torch.device, kind: str = "auto",
                compile: str = "off"):
    """kind: auto (batched when supported) | batched | hf. compile: off (eager) | on (the batched runner's decode
    step compiled, sparsefast.serve.compiled; raises where it cannot be) | auto (compiled where the batched runner
    runs and the compile succeeds, else eager, with a warning in the log when the compile failed)."""
    if kind not in ("auto", "batched", "hf"):
        raise ValueError(f"runner must be auto, batched or hf; got {kind!r}")
    check_compile_mode(compile)
    supported = batched_runner_supported(model, max_len)
    if kind == "batched" and not supported:
        raise ValueError(f"the batched runner does not support {type(model).__name__} at max_model_len {max_len}; "
                         "use runner='hf' or 'auto'")
    if compile == "on" and (kind == "hf" or not supported):
        raise ValueError(f"compile='on' needs the batched runner, which {type(model).__name__} at max_model_len "
                         f"{max_len} does not use; use compile='auto' or 'off'")
    if not (kind == "batched" or (kind == "auto" and supported)):
        return HFRequestRunner(model, max_batch, max_len, device)
    if compile == "off":
        return LlamaBatchRunner(model, max_batch, max_len, device)
    runner = LlamaBatchRunner(model, max_batch, max_len, device, spare_row=max_batch > 1)
    try:
        return CompiledRunner(runner, max_batch, max_len)
    except Exception as exc:
        if compile == "on":
            raise
        log.warning("compiling the decode step failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
        return runner
