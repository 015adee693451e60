"""The decode worker's Prometheus metrics, built per instance on a given registry (nothing at import time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.engine.types import EngineStats, StepInfo

# "rejected": refused before the first token (invalid request, queue full, draining).
OUTCOMES = ("stop", "length", "abort", "error", "rejected")
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 2048, 4096, 8192)
# CPU steps of a 135M model take milliseconds; GPU steps of large models and long prefills seconds.
_STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The batch wait: a quiet gap of a few ms (what a lone request pays), up to batch_wait_ms for a burst.
_WAIT_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05)


class DecodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.running_requests = Gauge("tandem_worker_running_requests", "Requests in the running batch.",
                                      registry=registry)
        self.waiting_requests = Gauge("tandem_worker_waiting_requests", "Requests queued for the batch.",
                                      registry=registry)
        self.kv_blocks_used = Gauge("tandem_worker_kv_blocks_used", "KV-cache blocks in use.", registry=registry)
        self.kv_blocks_total = Gauge("tandem_worker_kv_blocks_total", "KV-cache blocks in the pool.",
                                     registry=registry)
        self.prefix_cache_hit_rate = Gauge(
            "tandem_worker_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / prompt tokens looked up, since start.", registry=registry,
        )
        self.prefix_cache_queries = Counter("tandem_worker_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", registry=registry)
        self.prefix_cache_hits = Counter("tandem_worker_prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.", registry=registry)
        self.step_batch_size = Histogram("tandem_worker_step_batch_size", "Requests per forward pass.",
                                         buckets=_BATCH_BUCKETS, registry=registry)
        self.step_tokens = Histogram("tandem_worker_step_tokens", "Tokens computed per forward pass.",
                                     buckets=_TOKEN_BUCKETS, registry=registry)
        self.step_duration = Histogram("tandem_worker_step_duration_seconds", "Time of one forward pass.",
                                       buckets=_STEP_BUCKETS_S, registry=registry)
        self.batch_wait = Histogram(
            "tandem_worker_batch_wait_seconds",
            "How long the idle engine waited for more requests before a step (the batch wait).",
            buckets=_WAIT_BUCKETS_S, registry=registry)
        self.requests = Counter("tandem_worker_requests",
                                "Requests (Generate calls and GenerateStream requests) by how they ended.",
                                ["outcome"], registry=registry)
        self.generate_streams = Gauge(
            "tandem_worker_generate_streams",
            "Open GenerateStream calls (each frontend keeps one, carrying all its requests to this worker).",
            registry=registry)
        for outcome in OUTCOMES:  # export zeros so rate() works before the first of each
            self.requests.labels(outcome=outcome)
        self._last_queries = 0
        self._last_hits = 0

    def observe_stats(self, stats: EngineStats) -> None:
        """Called from the event loop with a fresh engine snapshot (about every 100 ms)."""
        self.running_requests.set(stats.num_running)
        self.waiting_requests.set(stats.num_waiting)
        self.kv_blocks_used.set(stats.num_kv_blocks_used)
        self.kv_blocks_total.set(stats.num_kv_blocks_total)
        queries, hits = stats.num_prefix_cache_queries, stats.num_prefix_cache_hits
        self.prefix_cache_hit_rate.set(hits / queries if queries else 0.0)
        # The engine keeps running totals; counters take the increase (never negative).
        self.prefix_cache_queries.inc(max(0, queries - self._last_queries))
        self.prefix_cache_hits.inc(max(0, hits - self._last_hits))
        self._last_queries, self._last_hits = queries, hits

    def observe_step(self, step: StepInfo) -> None:
        """The engine's on_step callback; runs on the engine thread (prometheus_client is thread-safe)."""
        self.step_batch_size.observe(step.num_seqs)
        self.step_tokens.observe(step.num_tokens)
        self.step_duration.observe(step.duration_s)
        if step.batch_wait_s is not None:
            self.batch_wait.observe(step.batch_wait_s)

    def observe_request(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()
