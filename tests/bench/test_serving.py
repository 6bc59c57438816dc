"""sparsefast.bench.serving: the metric definitions (vLLM's) on hand-made timings, the variant parsing, and one
real level against the story llama served in-process."""

from __future__ import annotations

import asyncio

import pytest

from sparsefast.bench.serving import (
    RequestResult,
    Variant,
    make_prompts,
    run_benchmark,
    run_level,
    start_server,
    summarize,
)
from sparsefast.data.evaluation import get_eval_text
from sparsefast.models import load_model
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine
from tests.serve.server_helpers import running_server


def test_summarize_follows_the_vllm_definitions():
    a = RequestResult(ok=True, ttft=0.1, latency=1.0, itl=[0.2, 0.3, 0.4], output_tokens=4)
    b = RequestResult(ok=True, ttft=0.3, latency=0.9, itl=[0.6], output_tokens=2)
    failed = RequestResult(ok=False, error="HTTP 429: busy")
    s = summarize([a, b, failed], wall_s=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 429: busy"]
    assert s["total_output_tokens"] == 6 and s["output_throughput_tok_s"] == 3.0 and s["request_throughput_rps"] == 1
    # TPOT per request = (latency - ttft) / (tokens - 1): 0.3 s and 0.6 s
    assert s["tpot_ms"]["mean"] == pytest.approx(450.0) and s["tpot_ms"]["p50"] == pytest.approx(450.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0) and s["e2el_ms"]["mean"] == pytest.approx(950.0)
    assert s["itl_ms"]["mean"] == pytest.approx(375.0)  # pooled over all gaps of all requests
    assert s["tpot_ms"]["p99"] == pytest.approx(300 + 0.99 * 300)


@pytest.mark.parametrize("spec", ["dense", "dense=smollm2", "dense=vllm:x", "=sparsefast:x", "a=sparsefast:"])
def test_bad_variant_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="NAME=KIND:TARGET"):
        Variant.parse(spec)


def test_one_level_against_a_real_server(story_llama_dir):
    model, tok = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tok, max_batch=4, max_model_len=256)
    with running_server(create_app(lambda: (engine, tok), ServerConfig(model_name="story"))) as base:
        v = Variant.parse(f"story=url:{base}")
        start_server(v, device="cpu", max_batch=4, max_queue=8, log_dir=None)  # kind url: nothing to launch
        prompts = make_prompts(tok, 6, 24, get_eval_text("wikitext2"))
        results, wall = asyncio.run(run_level(v, prompts, 12, 3, float("inf"), 0))
    s = summarize(results, wall)
    assert s["completed"] == 6 and s["failed"] == 0
    assert all(r.output_tokens == 12 for r in results)  # ignore_eos: exactly output_len, counted from usage
    assert all(22 <= r.prompt_tokens <= 27 for r in results)  # ~24 tokens + BOS, re-tokenized text
    assert all(0 < r.ttft < r.latency for r in results) and s["tpot_ms"]["p50"] > 0


def test_a_whole_run_against_a_server_given_by_url(story_llama_dir, tmp_path, capsys):
    # a url variant has no load time to report: the run says "ready" and measures it
    model, tok = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tok, max_batch=2, max_model_len=256)
    with running_server(create_app(lambda: (engine, tok), ServerConfig(model_name="story"))) as base:
        run = run_benchmark([Variant.parse(f"story=url:{base}")], tokenizer=tok, text=get_eval_text("wikitext2"),
                            concurrencies=[2], prompt_len=16, output_len=4, prompts_per_level={2: 4},
                            request_rate=float("inf"), device="cpu", max_batch=2, max_queue=8, load_timeout=10,
                            log_dir=tmp_path)
    assert "story ready\n" in capsys.readouterr().out
    assert run["variants"][0]["error"] is None and run["variants"][0]["levels"]["2"]["completed"] == 4
