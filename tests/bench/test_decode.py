"""sparsefast.bench.decode on a tiny random llama: the engine measurements make exactly N tokens, and weight bytes per
token count what a decode step reads."""

from __future__ import annotations

import math

import torch

from sparsefast.bench.decode import (
    IdTokenizer,
    engine_batch1,
    engine_concurrent,
    weight_bytes_per_token,
)
from sparsefast.serve.engine import GenerationEngine
from tests.conftest import tiny_model


def _all_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_weight_bytes_count_one_embedding_row_unless_tied():
    untied = tiny_model("llama", tie_word_embeddings=False)
    embed = untied.get_input_embeddings().weight
    assert weight_bytes_per_token(untied) == _all_bytes(untied) - embed.numel() * 4 + embed.shape[1] * 4
    tied = tiny_model("llama", tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    assert weight_bytes_per_token(tied) == _all_bytes(tied)


def test_weight_bytes_of_int8_layers_count_q_and_scales():
    """After the swap an int8-quantized linear's decode step reads q (1 byte per weight) and its scales, not the
    float weight it keeps for long prompts."""
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import DenseCpuLinear, sparsify_
    from tests.ops.sparse_cpu_helpers import require_cpu_kernels

    require_cpu_kernels()
    model = tiny_model("llama", tie_word_embeddings=True)
    prune(model, MagnitudeConfig(pattern="unstructured", sparsity=0.0, quantize="int8", device="cpu"),
          progress=False)
    before = weight_bytes_per_token(model)
    sparsify_(model)
    int8 = [m for m in model.modules() if isinstance(m, DenseCpuLinear) and m.qweight is not None]
    assert int8
    saved = sum(m.weight.numel() * 3 for m in int8)  # 4 -> 1 byte per weight; the scales were counted before too
    assert weight_bytes_per_token(model) == before - saved


def test_engine_measurements_make_exactly_n_tokens():
    model = tiny_model("llama")
    prompt = torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    assert IdTokenizer().decode([3, 4]) == "3 4"
    engine = GenerationEngine(model, IdTokenizer(), max_batch=2, max_model_len=32)
    engine.start()
    try:
        b1 = engine_batch1(engine, prompt, 5)  # asserts 5 tokens came
        conc = engine_concurrent(engine, [prompt, prompt[::-1]], 4)
    finally:
        engine.shutdown()
    assert b1["tokens_per_s"] > 0 and b1["decode_tokens_per_s"] > 0 and 0 < b1["ttft_s"]
    assert not math.isnan(b1["median_itl_s"]) and conc["output_tokens_per_s"] > 0 and conc["wall_s"] > 0
    assert conc["tpot_s_median"] > 0
