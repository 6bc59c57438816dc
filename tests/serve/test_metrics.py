"""The Prometheus metrics (sparsefast.serve.metrics) of the real server, read through prometheus' text parser: one
served request moves the request counter, the token counters and every latency histogram by exactly its share."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.server_helpers import MODEL, PROMPTS


def test_metrics_parse_and_count_what_was_served(served, client):
    base = served[0]

    def scrape() -> dict[str, dict]:
        text = httpx.get(base + "/metrics").text
        return {f.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
                for f in text_string_to_metric_families(text)}

    before = scrape()
    out = client.completions.create(model=MODEL, prompt=PROMPTS[9], max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 10
    after = scrape()

    def value(m, family, sample, **labels):
        return m.get(family, {}).get((sample, tuple(sorted(labels.items()))), 0.0)

    ok = dict(endpoint="/v1/completions", status="200")
    assert value(after, "sparsefast:requests", "sparsefast:requests_total", **ok) == \
        value(before, "sparsefast:requests", "sparsefast:requests_total", **ok) + 1
    gen = "sparsefast:generation_tokens"
    assert value(after, gen, gen + "_total") - value(before, gen, gen + "_total") == 10
    prompt = "sparsefast:prompt_tokens"
    assert value(after, prompt, prompt + "_total") - value(before, prompt, prompt + "_total") == \
        out.usage.prompt_tokens
    for hist in ("sparsefast:time_to_first_token_seconds", "sparsefast:request_time_per_output_token_seconds",
                 "sparsefast:e2e_request_latency_seconds"):
        assert value(after, hist, hist + "_count") == value(before, hist, hist + "_count") + 1
    assert value(after, "sparsefast:num_requests_running", "sparsefast:num_requests_running") == 0
    assert value(after, "sparsefast:num_requests_waiting", "sparsefast:num_requests_waiting") == 0


def test_failed_and_abandoned_requests_count_their_tokens(tokenizer):
    """A request the engine fails after 3 tokens (500) and a streamed one the client drops after 2 chunks still add
    the tokens they used to the token counters; neither adds a latency sample."""
    import time

    from tests.serve.scripted_engine import ScriptedEngine
    from tests.serve.server_helpers import SCRIPTED_MODEL, serve_scripted

    def scrape(base: str) -> dict[str, float]:
        text = httpx.get(base + "/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    gen, prompt = "sparsefast:generation_tokens_total", "sparsefast:prompt_tokens_total"
    ttft = "sparsefast:time_to_first_token_seconds_count"
    ids = tokenizer("Once upon a time")["input_ids"]
    with serve_scripted(ScriptedEngine(fail_after=3), tokenizer) as base:
        r = httpx.post(base + "/v1/completions", json={"model": SCRIPTED_MODEL, "prompt": ids, "max_tokens": 10})
        assert r.status_code == 500
        after = scrape(base)
        assert after[gen] == 3 and after[prompt] == len(ids) and after.get(ttft, 0) == 0
    with serve_scripted(ScriptedEngine(step_s=0.05), tokenizer) as base:
        body = {"model": SCRIPTED_MODEL, "prompt": ids, "max_tokens": 50, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body) as s:
            chunks = 0
            for line in s.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 2:
                    break
        deadline = time.monotonic() + 10
        while scrape(base).get(gen, 0) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = scrape(base)
        assert 2 <= after[gen] < 50 and after[prompt] == len(ids) and after.get(ttft, 0) == 0


def test_request_counter_is_labelled_by_route_template(tokenizer):
    """Paths a client makes up do not add series: unknown /v1 paths are not counted, model ids share the template."""
    from tests.serve.scripted_engine import ScriptedEngine
    from tests.serve.server_helpers import serve_scripted

    with serve_scripted(ScriptedEngine(), tokenizer) as base:
        for path in ("/v1/nope/1", "/v1/nope/2", "/v1/models/a", "/v1/models/b", "/v1/models"):
            httpx.get(base + path)
        text = httpx.get(base + "/metrics").text
    counts = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "sparsefast:requests_total"}
    assert counts == {(("endpoint", "/v1/models/{model_id:path}"), ("status", "404")): 2,
                      (("endpoint", "/v1/models"), ("status", "200")): 1}
