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
    for hist in ("sparsefast:time_to_first_token_seconds", "sparsefast:time_per_output_token_seconds",
                 "sparsefast:e2e_request_latency_seconds"):
        assert value(after, hist, hist + "_count") == value(before, hist, hist + "_count") + 1
    assert value(after, "sparsefast:num_requests_running", "sparsefast:num_requests_running") == 0
    assert value(after, "sparsefast:num_requests_waiting", "sparsefast:num_requests_waiting") == 0
