"""Prometheus metrics for one app: a registry of its own (two apps in one process never share a counter).

Request counters and latency histograms are recorded by the handlers through `RequestTimer`; engine gauges
(running and waiting requests, KV-cache usage, prefix-cache hits) are read from the engine client's latest stats
snapshot when /metrics is scraped, so the engine thread does no metrics work per step. The process's own metrics
(`process_resident_memory_bytes`, open fds, CPU time) come from prometheus_client, as in vLLM.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from glmserve.engine.engine_client import AsyncEngineClient

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, client: AsyncEngineClient):
        self._client = client

    def collect(self):
        s = self._client.stats
        yield CounterMetricFamily("glmserve:engine_steps", "Engine steps run.", self._client.num_steps)
        yield GaugeMetricFamily("glmserve:num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily("glmserve:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield GaugeMetricFamily("glmserve:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).",
                                s.kv_cache_usage)
        yield CounterMetricFamily("glmserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  s.prefix_cache_queries)
        yield CounterMetricFamily("glmserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits)
        kv = self._client.info.kv_cache if self._client.info is not None else None
        if kv is not None:  # vLLM's cache_config_info: the configuration as labels on a gauge of 1
            info = GaugeMetricFamily("glmserve:cache_config_info", "The KV cache's configuration.",
                                     labels=["cache_dtype", "block_size", "num_gpu_blocks", "num_tokens"])
            info.add_metric([kv.dtype, str(kv.block_size), str(kv.num_blocks), str(kv.num_tokens)], 1)
            yield info
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield GaugeMetricFamily("glmserve:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens.", rate)
        spec = s.spec_decoding
        if spec is not None:  # vLLM's spec_decode_* counters; mean acceptance length = 1 + accepted / drafts
            yield CounterMetricFamily("glmserve:spec_decode_num_drafts", "Verification runs with drafts.",
                                      spec.num_drafts)
            yield CounterMetricFamily("glmserve:spec_decode_num_draft_tokens", "Draft tokens proposed.",
                                      spec.num_draft_tokens)
            yield CounterMetricFamily("glmserve:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                      spec.num_accepted_tokens)
            per_position = CounterMetricFamily("glmserve:spec_decode_num_accepted_tokens_per_pos",
                                               "Draft tokens accepted, by position in the draft.",
                                               labels=["position"])
            for position, accepted in enumerate(spec.accepted_per_position):
                per_position.add_metric([str(position)], accepted)
            yield per_position


class Metrics:
    def __init__(self, client: AsyncEngineClient):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("glmserve:requests", "Requests admitted to the engine, by API (chat, completions, "
                                "anthropic, responses).", ["api"], registry=r)
        self.finished = Counter("glmserve:request_success", "Finished choices, by finish reason.",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("glmserve:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("glmserve:generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("glmserve:time_to_first_token_seconds", "Time to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("glmserve:time_per_output_token_seconds", "Time per generated token after the first.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("glmserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(client))
        ProcessCollector(registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One API request's timing; its choices report their tokens and finish reasons."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._arrival = time.monotonic()
        self._first_token: float | None = None

    def tokens_arrived(self) -> None:
        if self._first_token is None:
            self._first_token = time.monotonic()

    def finish(self, num_prompt_tokens: int, output_tokens: list[int], finish_reasons: list[str | None]) -> None:
        """Record the request; `output_tokens` and `finish_reasons` per choice (None: aborted)."""
        m = self._metrics
        now = time.monotonic()
        m.prompt_tokens.inc(num_prompt_tokens)
        m.generation_tokens.inc(sum(output_tokens))
        for reason in finish_reasons:
            m.finished.labels(reason or "abort").inc()
        m.e2e.observe(now - self._arrival)
        if self._first_token is not None:
            m.ttft.observe(self._first_token - self._arrival)
            longest = max(output_tokens, default=0)
            if longest > 1:
                m.tpot.observe((now - self._first_token) / (longest - 1))
