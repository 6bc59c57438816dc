"""The compiled decode step (sparsefast.serve.compiled) against the eager step, on the tiny story llama (CPU, inductor's
C++ backend): greedy output token for token, with requests of different prompt lengths joining and leaving so the
batch crosses bucket boundaries and changes size within a bucket, without a recompile (graphs counted); the sparse CPU
ops stay inside the one graph; 2:4 with the kernels swapped in; structural per-layer widths and bf16 (slow: a
compile each). The inductor cache (TORCHINDUCTOR_CACHE_DIR) makes a second run compile in seconds."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsefast.serve import runner as runner_module
from sparsefast.serve.compiled import CompiledRunner, batch_buckets, bucket_for
from sparsefast.serve.engine import GenerationEngine, SamplingParams
from sparsefast.serve.runner import LlamaBatchRunner

PROMPTS = ["Once upon a time", "The little dog ran to the park and saw a big", "Tom had a red ball. He",
           "Lily", "One day, a girl named Sue went to the shop with her mom. She wanted to buy", "The sun"]
MAX_TOKENS = [14, 5, 9, 12, 3, 8]  # finishing at different steps: the batch shrinks 4 -> 3 -> ... and others join


def _load(story_llama_dir, **kw):
    from sparsefast.api import load

    return load(story_llama_dir, **kw)


def served(model, tok, compile: str, max_batch: int, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    """Every request queued before the engine starts (the first step admits max_batch of them in one padded
    prefill; the rest join as slots free up). Returns (token ids per request, engine)."""
    engine = GenerationEngine(model, tok, max_batch=max_batch, max_model_len=96, compile=compile)
    try:
        streams = [engine.submit(tok(p)["input_ids"], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                   for p, n in zip(prompts, max_tokens)]
        engine.start()
        return [[t for ev in s for t in ev.token_ids] for s in streams], engine
    finally:
        engine.shutdown()


def test_batch_buckets():
    assert batch_buckets(1) == (1,) and batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6)
    assert [bucket_for(b, (1, 2, 4, 6)) for b in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        bucket_for(5, (1, 2, 4))
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        batch_buckets(0)


def test_compiled_greedy_equals_eager_batched_across_buckets_without_recompiling(story_llama_dir):
    model, tok = _load(story_llama_dir)
    eager, _ = served(model, tok, "off", max_batch=4)
    compiled, engine = served(model, tok, "on", max_batch=4)
    assert isinstance(engine.runner, CompiledRunner)
    assert compiled == eager
    # one graph per bucket, compiled at construction; batches of 1..4 and every key length reused them
    assert sorted(engine.compile_seconds) == [1, 2, 4] and engine.runner.graphs == 3


def test_compiled_equals_eager_with_the_dense_cpu_kernel(story_llama_dir):
    """A dense model as serve runs it (sparsify_ auto: every linear a DenseCpuLinear): compiled == eager == the
    model with torch's F.linear everywhere."""
    from sparsefast.nn import DenseCpuLinear, SparsifyConfig, sparsify_

    model, tok = _load(story_llama_dir)
    args = dict(max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    plain, _ = served(model, tok, "off", **args)
    sparsify_(model, SparsifyConfig())
    assert isinstance(model.lm_head, DenseCpuLinear)
    eager, _ = served(model, tok, "off", **args)
    compiled, engine = served(model, tok, "on", **args)
    assert compiled == eager == plain and engine.runner.graphs == 2


def test_compiled_sdpa_step_on_cpu_equals_eager_across_lengths():
    """The CPU step without the decode-attention kernel (a build without the extension): SDPA over the masked cache
    with the key count a dynamic dimension: one graph for every length, logits equal to the eager step's."""
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    cpu = torch.device("cpu")
    runners = [LlamaBatchRunner(model, max_batch=2, max_len=24, device=cpu, spare_row=True) for _ in range(2)]
    for r in runners:
        r.decode_kernel = False
    eager, compiled = runners[0], CompiledRunner(runners[1], max_batch=2, max_len=24)
    prompts = [[5, 17, 33, 4, 9], [7, 8]]
    with torch.inference_mode():
        for r in (eager, compiled):
            r.prefill([0, 1], prompts)
        positions = [5, 2]
        for step in range(6):
            ids = [11 + step, 40 + step]
            torch.testing.assert_close(compiled.decode([0, 1], ids, positions), eager.decode([0, 1], ids, positions),
                                       rtol=1e-5, atol=1e-5)
            positions = [p + 1 for p in positions]
    assert compiled.graphs == 2  # buckets 1 and 2, no recompile as the lengths grew


def test_sparse_cpu_ops_stay_inside_one_graph(story_llama_dir):
    """torch._dynamo.explain over the step a 2:4 model with the CPU kernels swapped in runs: no graph break, the
    sparse op and the decode-attention op in the graph (tracing only, no inductor compile)."""
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import SparsifyConfig, sparsify_, swapped_layer_names

    model, _ = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    assert len(swapped_layer_names(sparsify_(model, SparsifyConfig(calibrate=False)))) == 14
    runner = LlamaBatchRunner(model, max_batch=2, max_len=32, device=torch.device("cpu"), spare_row=True)
    assert runner.decode_kernel  # decode attends with the CPU kernel: no mask
    inputs = (torch.tensor([[5], [0]]), torch.tensor([[3], [0]]), torch.tensor([0, 2]), None)
    with torch.inference_mode():
        runner.decode_static(*inputs)  # the eager call that decides each layer's route for M = 2
        explained = torch._dynamo.explain(runner.decode_static)(*inputs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    ops = {str(node.target) for g in explained.graphs for node in g.graph.nodes}
    assert "sparsefast.sparse24_linear_cpu.default" in ops
    assert "sparsefast.dense_linear_cpu.default" in ops  # the dense (tied) head: sparsify_ auto's DenseCpuLinear
    assert "sparsefast.decode_attention_cpu.default" in ops


def test_auto_falls_back_to_eager_when_the_compile_fails(story_llama_dir, monkeypatch, caplog):
    model, tok = _load(story_llama_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(runner_module, "CompiledRunner", broken)
    with caplog.at_level(logging.WARNING, logger="sparsefast.serve.runner"):
        engine = GenerationEngine(model, tok, max_batch=2, max_model_len=32, compile="auto")
    assert type(engine.runner) is LlamaBatchRunner and engine.compile_seconds == {}
    assert "compiling the decode step failed (RuntimeError: no C++ compiler); decoding eagerly" in caplog.text
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        GenerationEngine(model, tok, max_batch=2, max_model_len=32, compile="on")


@pytest.mark.parametrize("mode", ["auto", "sparse24"])
def test_compiled_equals_eager_two_four_with_the_cpu_kernels(story_llama_dir, mode):
    """auto: SparseLinear (the CPU layout alone); sparse24 (`serve --sparse sparse24`): Sparse24Linear, whose route
    decision (it loads the extension) must be made before the capture, or the compile fails."""
    from sparsefast.api import prune
    from sparsefast.config import MagnitudeConfig
    from sparsefast.nn import SparsifyConfig, sparsify_

    model, tok = _load(story_llama_dir)
    prune(model, MagnitudeConfig(pattern="2:4", device="cpu"), progress=False)
    sparsify_(model, SparsifyConfig(mode=mode, calibrate=False))
    eager, _ = served(model, tok, "off", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    compiled, engine = served(model, tok, "on", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    assert compiled == eager and engine.runner.graphs == 2


@pytest.mark.slow
def test_compiled_equals_eager_structural_per_layer_widths(story_llama_dir, tmp_path):
    from sparsefast.models import save_structural
    from sparsefast.prune.structural import StructuralConfig, prune_structured

    model, tok = _load(story_llama_dir)
    prune_structured(model, tok, StructuralConfig(ratio=0.5, importance="l2", layers="0-0", gqa="kv_groups"))
    save_structural(model, tmp_path / "struct", tokenizer=tok)
    model, tok = _load(tmp_path / "struct")
    assert model.model.layers[0].self_attn.k_proj.out_features < model.model.layers[1].self_attn.k_proj.out_features
    eager, _ = served(model, tok, "off", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    compiled, engine = served(model, tok, "on", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    assert compiled == eager and engine.runner.graphs == 2


@pytest.mark.slow
def test_compiled_equals_eager_bf16(story_llama_dir):
    model, tok = _load(story_llama_dir, dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    eager, _ = served(model, tok, "off", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    compiled, engine = served(model, tok, "on", max_batch=2, prompts=PROMPTS[:3], max_tokens=MAX_TOKENS[:3])
    assert compiled == eager and engine.runner.graphs == 2


def test_the_cache_key_tag_names_our_op_schemas():
    """Compiled steps are cached per version of the sparsefast op schemas (an artifact compiled for another argument
    list would call the op wrongly), next to any tag the user set."""
    import torch.compiler.config

    from sparsefast._ext import load_cpu_extension
    from sparsefast.serve.compiled import ops_cache_tag

    load_cpu_extension()
    with torch.compiler.config.patch(cache_key_tag=""):
        tag = ops_cache_tag()
    assert tag.startswith("sparsefast-ops-") and len(tag) == len("sparsefast-ops-") + 16
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert ops_cache_tag() == "mine+" + tag
    with torch.compiler.config.patch(cache_key_tag="mine+" + tag):  # once
        assert ops_cache_tag() == "mine+" + tag
