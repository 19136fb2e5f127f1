"""Prometheus metrics for one server: latencies, queue, KV cache, tokens (an app-local registry).

Latency histograms and token counters are fed on the event loop as outputs arrive; engine-side
gauges (queue lengths, KV usage, prefix-cache hits, preemptions) are read at scrape time from the
snapshot the engine thread publishes, so a scrape never touches the Engine itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kestrel.engine.async_engine import EngineSnapshot
from kestrel.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0,
                    60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                1.0, 2.5)


class _SnapshotCollector(Collector):
    """Engine gauges and counters, read from the latest snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], healthy: Callable[[], bool]
                 ) -> None:
        self._snapshot = snapshot
        self._healthy = healthy

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        gauges = [
            ("kestrel_num_requests_waiting", "Requests waiting to be scheduled", s.waiting),
            ("kestrel_num_requests_running", "Requests (samples) running", s.running),
            ("kestrel_kv_cache_usage_perc", "Fraction of KV blocks in use (0..1)", s.kv_usage),
            ("kestrel_kv_cache_blocks_used", "KV blocks referenced by live requests",
             s.kv_blocks_used),
            ("kestrel_kv_cache_blocks_total", "KV blocks in the pool", s.kv_blocks_total),
            ("kestrel_prefix_cache_hit_rate",
             "Prompt tokens served from the prefix cache / prompt tokens looked up", hit_rate),
            ("kestrel_engine_healthy", "1 while the engine loop runs and accepts work",
             1.0 if self._healthy() else 0.0),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        counters = [
            ("kestrel_num_preemptions", "Requests preempted for lack of KV blocks", s.preemptions),
            ("kestrel_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             s.prefix_cache_queries),
            ("kestrel_prefix_cache_hits", "Prompt tokens found in the prefix cache",
             s.prefix_cache_hits),
            ("kestrel_engine_steps", "Engine steps run", s.steps),
            ("kestrel_spec_decode_num_draft_tokens", "Speculative proposals verified",
             s.spec_draft_tokens),
            ("kestrel_spec_decode_num_accepted_tokens", "Speculative proposals the target kept",
             s.spec_accepted_tokens),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """One registry per app (tests start several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("kestrel_time_to_first_token_seconds", "Time to first token",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.itl = Histogram("kestrel_inter_token_latency_seconds", "Time between tokens",
                             registry=r, buckets=_ITL_BUCKETS)
        self.e2e = Histogram("kestrel_e2e_request_latency_seconds", "Arrival to last token",
                             registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("kestrel_prompt_tokens", "Prompt tokens of started requests",
                                     registry=r)
        self.generation_tokens = Counter("kestrel_generation_tokens", "Tokens generated",
                                         registry=r)
        self.finished = Counter("kestrel_request_success", "Requests finished, by reason",
                                ["finished_reason"], registry=r)
        self.aborted = Counter("kestrel_request_aborted", "Requests aborted before finishing "
                               "(client gone, shutdown)", registry=r)
        self.http_errors = Counter("kestrel_http_errors", "Error responses, by status",
                                   ["status"], registry=r)

    def count_error(self, status: int) -> None:
        """One error answer (4xx, 5xx), whoever sent it: a route, a handler or the guard."""
        self.http_errors.labels(status=str(status)).inc()

    def attach_engine(self, snapshot: Callable[[], EngineSnapshot],
                      healthy: Callable[[], bool]) -> None:
        self.registry.register(_SnapshotCollector(snapshot, healthy))

    # ---- OutputListener -----------------------------------------------------------------
    def on_tokens(self, num_prompt: int, num_new: int) -> None:
        if num_prompt:
            self.prompt_tokens.inc(num_prompt)
        if num_new > 0:
            self.generation_tokens.inc(num_new)

    def on_finished(self, out: RequestOutput) -> None:
        for c in out.outputs:
            self.finished.labels(finished_reason=c.finish_reason or "unknown").inc()
        m = out.metrics
        if m is None:
            return
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for dt in m.inter_token_latencies:
            self.itl.observe(dt)
        if m.e2e_latency is not None:
            self.e2e.observe(m.e2e_latency)

    def on_aborted(self) -> None:
        self.aborted.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
