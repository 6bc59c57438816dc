"""sparsefast.prune.structural.strategies: LLM-Pruner's rounding rule and what a plan removes under each rule."""

from __future__ import annotations

import pytest

from sparsefast.config.structural import StructuralConfig
from sparsefast.prune.structural.graph import build_graph
from sparsefast.prune.structural.strategies import _count, plan_candidates
from tests.conftest import tiny_model


@pytest.mark.parametrize("ratio,n,width,half_up,keep_floor", [
    (0.2, 1536, 1, 307, 308),      # SmolLM2 MLP: 1536 - int(1228.8) = 308
    (0.2, 11008, 1, 2202, 2202),   # LLaMA-7B MLP at 20%: 11008 - int(8806.4)
    (0.25, 11008, 1, 2752, 2752),
    (0.2, 32, 128, 6, 6),          # LLaMA-7B heads: (4096 - int(3276.8)) // 128 = 820 // 128
    (0.2, 3, 64, 1, 0),            # SmolLM2 KV groups: (192 - int(153.6)) // 64 = 39 // 64
    (0.3, 2, 16, 1, 0),            # (32 - int(22.4)) // 16 = 10 // 16
    (0.0, 9, 64, 0, 0),
])
def test_rounding_rules(ratio, n, width, half_up, keep_floor):
    assert _count(ratio, n, "half_up", width) == half_up
    assert _count(ratio, n, "keep_floor", width) == keep_floor


def test_keep_floor_changes_what_a_plan_removes():
    model = tiny_model("llama").float()
    graph = build_graph(model)
    removes = {}
    for rounding in ("half_up", "keep_floor"):
        plan = plan_candidates(model, graph, StructuralConfig(ratio=0.3, layers="0-1", rounding=rounding))
        removes[rounding] = sorted({(b.kind, b.remove) for b in plan.buckets})
    # MLP 128 channels: half up 38.4 → 38, LLM-Pruner 128 - int(89.6) = 39; query heads 2 per KV group: 1 vs 0
    assert removes == {"half_up": [("mlp", 38), ("query", 1)], "keep_floor": [("mlp", 39), ("query", 0)]}
