"""Structured-slice microbenchmark: the physical slice of one decoder layer after 20% block-wise pruning (LLM-Pruner):
kept heads (q/k/v rows + o_proj columns, head_dim 128; GQA keeps every KV head) and kept MLP channels (gate/up rows +
down_proj columns), bf16, at every LLaMA layer of sparsefast.bench.shapes.

- cuda_op_ms: sparsefast.ops.structured_gather, all matrices of the layer in one launch (includes the one-sync index
  range check); cuda_kernel_ms: the raw extension call (no checks); torch_twin_ms: one index_select per matrix.
Bytes: kept elements read once and written once. Quick mode (CPU): a tiny layer, torch only; timings mean nothing.
"""

from __future__ import annotations

import pytest
import torch

from sparsefast.bench.memory import gbs
from sparsefast.bench.shapes import MODELS, PER_LAYER, quick_mode
from sparsefast.bench.timing import time_ms
from sparsefast.ops.structured_gather import structured_gather, structured_gather_ref

QUICK = quick_mode()
RATIO, HEAD_DIM = 0.2, 128
LAYERS = {"tiny": {"qkvo_proj": (96, 96), "gate_up_proj": (200, 96), "down_proj": (96, 200)}} if QUICK else MODELS


def kept(n: int, unit: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """Indices of the kept units (1 - RATIO of n // unit, random) expanded to rows/columns, sorted."""
    units = n // unit
    keep = torch.randperm(units, generator=gen)[: units - int(RATIO * units + 0.5)].sort().values
    return (keep[:, None] * unit + torch.arange(unit)).flatten().to(device)


def layer_problem(name: str, device: str):
    """(mats, dims, indices) of one pruned layer of model `name`."""
    gen = torch.Generator().manual_seed(0)
    shapes = LAYERS[name]
    hd = 16 if QUICK else HEAD_DIM
    mats, dims, idx = [], [], []

    def add(shape, dim, index):
        mats.append(torch.randn(shape, generator=gen).to(torch.bfloat16).to(device))
        dims.append(dim)
        idx.append(index)

    if "qkvo_proj" in shapes:
        out, inn = shapes["qkvo_proj"]
        heads = kept(out, hd, gen, device)
        for _ in range(3):
            add((out, inn), 0, heads)
        add((inn, out), 1, heads)
    else:
        out, inn = shapes["qo_proj"]
        heads = kept(out, hd, gen, device)  # query heads; KV heads are all kept and need no gather
        add((out, inn), 0, heads)
        add((inn, out), 1, heads)
    out, inn = shapes["gate_up_proj"]
    channels = kept(out, 1, gen, device)
    add((out, inn), 0, channels)
    add((out, inn), 0, channels)
    add(shapes["down_proj"], 1, channels)
    return mats, dims, idx


@pytest.mark.parametrize("name", list(LAYERS))
def test_structured_gather(benchmark, name, results, copy_gbs, device):
    from sparsefast._ext import load_extension

    mats, dims, idx = layer_problem(name, device)
    ext = load_extension() if device == "cuda" else None
    backend = "cuda" if ext is not None else "torch"
    benchmark(lambda: structured_gather(mats, dims, idx, backend=backend))
    got = structured_gather(mats, dims, idx, backend=backend)
    for g, r in zip(got, structured_gather_ref(mats, dims, idx)):
        assert torch.equal(g, r), "gather differs from index_select: timings meaningless"
    nbytes = 2 * sum(g.numel() * g.element_size() for g in got)
    row = {"model": name, "matrices": [list(m.shape) for m in mats], "dims": dims, "ratio": RATIO,
           "dtype": "bfloat16", "bytes": nbytes, "backend": backend,
           "torch_twin_ms": time_ms(lambda: structured_gather_ref(mats, dims, idx))}
    if ext is not None:
        row["cuda_op_ms"] = time_ms(lambda: structured_gather(mats, dims, idx, backend="cuda"))
        row["cuda_kernel_ms"] = time_ms(lambda: ext.structured_gather(mats, dims, idx))
        row["cuda_kernel_gbs"] = gbs(nbytes, row["cuda_kernel_ms"])
        row["kernel_frac_of_copy_bw"] = row["cuda_kernel_gbs"] / copy_gbs
        row["speedup_kernel_vs_twin"] = row["torch_twin_ms"] / row["cuda_kernel_ms"]
        row["speedup_op_vs_twin"] = row["torch_twin_ms"] / row["cuda_op_ms"]
    row["torch_twin_gbs"] = gbs(nbytes, row["torch_twin_ms"])
    row["layers_per_model_layer"] = PER_LAYER.get(name, {})
    results.setdefault("structured_gather", []).append(row)
    print(f"\nstructured_gather {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                                     if isinstance(v, float)))
