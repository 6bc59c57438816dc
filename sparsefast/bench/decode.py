"""Decode-speed measurements in gpt-fast's units: tokens/s with the weight bytes each token reads next to them.

* `engine_batch1`: one request through sparsefast.serve's GenerationEngine: tokens/s end to end (N new tokens / time
  from submit to the last token), decode-only ((N - 1) / time from the first to the last token), TTFT, and the median
  inter-token latency (robust to the few-ms stalls a shared CPU adds to some steps: 1 / ITL is the steady state).
* `engine_concurrent`: C requests submitted together; output-token throughput = C·N / (last token − submit), and
  each request's TPOT = (last − first token) / (N − 1).
* `weight_bytes_per_token`: every parameter and buffer a decode step reads (shared tensors once; an untied input
  embedding counts one row, the LM head counts whole; a CPU-kernel linear counts what its route reads at one token:
  a sparse layout or the dense weight, int8 values with their scales), so weight GB/s = bytes/token × tokens/s,
  compared with sparsefast.bench.memory.memory_bandwidth.
EOS is ignored (`ignore_eos`) so every request makes exactly N tokens. The side-by-side benchmark built on these
(variants and peers, each in a worker process) is sparsefast.bench.decode_run.
"""

from __future__ import annotations

import statistics
import time

import torch

from sparsefast.serve.engine import GenerationEngine, SamplingParams


class IdTokenizer:
    """For random-weight models: token ids as text (the engine needs decode; there is no EOS)."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of every parameter/buffer a one-token decode step reads (module docstring)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == \
        embed.data_ptr()
    seen, total = set(), 0
    for mod in model.modules():
        if hasattr(mod, "tensors_read"):  # a CPU-kernel linear (sparse, or int8): count the path a token takes
            probe = torch.zeros(1, mod.in_features, dtype=embed.dtype, device=embed.device)
            read = mod.tensors_read(probe)
            total += sum(t.numel() * t.element_size() for t in read if t.data_ptr() not in seen)
            seen.update(t.data_ptr() for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)))
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if t.data_ptr() == embed.data_ptr() and not tied:
            total += embed.shape[1] * embed.element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def _median_gap(times: list[float]) -> float:
    """Median time between consecutive tokens."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def engine_batch1(engine: GenerationEngine, prompt: list[int], n: int) -> dict[str, float]:
    """One greedy request of exactly `n` tokens: tokens_per_s, decode_tokens_per_s, ttft_s, median_itl_s."""
    stream = engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    events = [e for e in stream if e.token_ids]
    assert len(events) == n, f"engine produced {len(events)} tokens, expected {n}"
    first, last = events[0].time, events[-1].time
    return {"tokens_per_s": n / (last - stream.submitted), "decode_tokens_per_s": (n - 1) / (last - first)
            if n > 1 else float("nan"), "ttft_s": first - stream.submitted,
            "median_itl_s": _median_gap([e.time for e in events])}


def engine_concurrent(engine: GenerationEngine, prompts: list[list[int]], n: int) -> dict[str, float]:
    """All prompts submitted together, `n` tokens each: output_tokens_per_s, wall_s, tpot_s_median, median_itl_s."""
    t0 = time.perf_counter()
    streams = [engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)) for p in prompts]
    ends, tpots, itls = [], [], []
    for s in streams:
        events = [e for e in s if e.token_ids]
        assert len(events) == n
        ends.append(events[-1].time)
        tpots.append((events[-1].time - events[0].time) / max(n - 1, 1))
        itls.append(_median_gap([e.time for e in events]))
    wall = max(ends) - t0
    return {"output_tokens_per_s": len(prompts) * n / wall, "wall_s": wall,
            "tpot_s_median": statistics.median(tpots), "median_itl_s": statistics.median(itls)}
