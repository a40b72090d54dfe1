"""Prometheus metrics with vLLM's names under the prefix ``blocks:`` (``GET /metrics``).

Engine gauges and cumulative counters (``num_requests_running``, ``num_requests_waiting``,
``kv_cache_usage_perc``, ``num_preemptions_total``, ``prefix_cache_queries_total``,
``prefix_cache_hits_total``) are read from the engine's latest stats at scrape time, so they are
never stale. Request counters and histograms (``prompt_tokens_total``, ``generation_tokens_total``,
``request_success_total{finished_reason}``, ``time_to_first_token_seconds``,
``e2e_request_latency_seconds``, ``time_per_output_token_seconds``) are recorded by the routes.
Each app has its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import threading
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class _EngineCollector:
    """Reads ``engine.stats`` (a dict refreshed by every engine message) on each scrape."""

    def __init__(self, engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self):
        s = self.engine.stats
        labels = ["model_name"]
        for name, key, doc in (
            ("blocks:num_requests_running", "num_running", "Requests in the running batch."),
            ("blocks:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
            ("blocks:kv_cache_usage_perc", "kv_usage", "Fraction of KV cache blocks in use (0 to 1)."),
        ):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], float(s.get(key, 0)))
            yield g
        for name, key, doc in (
            ("blocks:num_preemptions", "num_preemptions", "Preemptions since start."),
            ("blocks:prefix_cache_queries", "prefix_queries", "Tokens looked up in the prefix cache."),
            ("blocks:prefix_cache_hits", "prefix_hits", "Tokens found in the prefix cache."),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], float(s.get(key, 0)))
            yield c


class _WeightedHistogram:
    """A one-label histogram whose ``observe(value, count)`` adds ``count`` equal samples in O(1).

    Streams record one inter-token interval per token, several tokens per chunk: prometheus_client's
    ``Histogram.observe`` would cost a call (and a lock) per token; this costs one bisect per chunk and
    exports the same ``_bucket`` / ``_count`` / ``_sum`` series.
    """

    def __init__(self, name: str, doc: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        with self._lock:
            self.counts[bisect_left(self.bounds, value)] += count  # le-buckets: value <= bound
            self.sum += value * count

    def collect(self):
        with self._lock:
            counts, total = list(self.counts), self.sum
        buckets, acc = [], 0
        for bound, c in zip(self.bounds + [float("inf")], counts):
            acc += c
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        h = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        h.add_metric([self.label], buckets, total)
        yield h


class ServerMetrics:
    """The server's registry: engine collector plus request counters and latency histograms.

    Args:
        engine: anything with a ``stats`` dict (an :class:`~blocks.engine.async_llm.AsyncLLM`).
        model_name: the served model name (the ``model_name`` label).
    """

    def __init__(self, engine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        r = self.registry
        self.prompt_tokens = Counter("blocks:prompt_tokens", "Prompt tokens processed.", ["model_name"], registry=r)
        self.generation_tokens = Counter("blocks:generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=r)
        self.request_success = Counter("blocks:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("blocks:time_to_first_token_seconds", "Time from arrival to the first token.",
                              ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("blocks:e2e_request_latency_seconds", "Time from arrival to the end of a request.",
                             ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("blocks:time_per_output_token_seconds", "Mean time between a request's tokens.",
                              ["model_name"], buckets=_TPOT_BUCKETS, registry=r)
        self.itl = _WeightedHistogram("blocks:inter_token_latency_seconds",
                                      "Time between consecutive output tokens.", model_name, _TPOT_BUCKETS)
        r.register(self.itl)
        self.queue_time = Histogram("blocks:request_queue_time_seconds", "Time from arrival to first scheduling.",
                                    ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        for metric in (self.prompt_tokens, self.ttft, self.e2e, self.tpot, self.queue_time):
            metric.labels(model_name)  # exported at 0 from the start, as scrapers expect
        self._generated = self.generation_tokens.labels(model_name)  # per chunk: no label lookup

    def on_first_output(self, *, num_prompt_tokens: int, ttft_s: float | None, queue_s: float | None = None) -> None:
        """A request produced its first output (its prompt was processed)."""
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)
        if ttft_s is not None:
            self.ttft.labels(self.model_name).observe(max(ttft_s, 0.0))
        if queue_s is not None:
            self.queue_time.labels(self.model_name).observe(max(queue_s, 0.0))

    def on_inter_token(self, gap_s: float, num_tokens: int) -> None:
        """``num_tokens`` tokens arrived ``gap_s`` after the previous ones: one interval per token."""
        if num_tokens > 0:
            self.itl.observe(max(gap_s, 0.0) / num_tokens, num_tokens)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens:
            self._generated.inc(num_tokens)

    def on_finished(self, *, finish_reasons: list[str], e2e_s: float, decode_s: float | None,
                    num_generated: int) -> None:
        """A request finished (every choice has a finish reason)."""
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason or "unknown").inc()
        self.e2e.labels(self.model_name).observe(max(e2e_s, 0.0))
        if decode_s is not None and num_generated > 1:
            self.tpot.labels(self.model_name).observe(max(decode_s, 0.0) / (num_generated - 1))

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
