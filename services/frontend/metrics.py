"""The frontend's Prometheus metrics; one instance per registry, so tests and processes never share state."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 1 ms .. 60 s: a small model's inter-token latency on a GPU is ~1-5 ms, while a long prompt's
# time to first token on a CPU runs to tens of seconds.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5,
    0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 45.0, 60.0,
)
DURATION_BUCKETS_S = (*LATENCY_BUCKETS_S, 120.0, 300.0, 600.0)
TOKEN_BUCKETS = (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# Values of the ``status`` label besides the TandemError codes.
STATUS_SUCCESS = "success"
STATUS_CANCELLED = "cancelled"


class FrontendMetrics:
    """Request counts, latencies and sequence lengths, labelled by served model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tandem_frontend_requests_total", "Requests finished, by outcome",
            ["model", "endpoint", "request_type", "status"], registry=registry,
        )
        self.inflight = Gauge(
            "tandem_frontend_inflight_requests", "Requests being generated now", ["model"], registry=registry,
        )
        self.time_to_first_token = Histogram(
            "tandem_frontend_time_to_first_token_seconds", "From request received to first token out",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.inter_token_latency = Histogram(
            "tandem_frontend_inter_token_latency_seconds", "Time between consecutive output tokens",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.request_duration = Histogram(
            "tandem_frontend_request_duration_seconds", "From request received to last token out",
            ["model"], buckets=DURATION_BUCKETS_S, registry=registry,
        )
        self.input_sequence_tokens = Histogram(
            "tandem_frontend_input_sequence_tokens", "Prompt length in tokens",
            ["model"], buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.output_sequence_tokens = Histogram(
            "tandem_frontend_output_sequence_tokens", "Generated tokens per request",
            ["model"], buckets=TOKEN_BUCKETS, registry=registry,
        )
        self.output_tokens = Counter(
            "tandem_frontend_output_tokens_total", "Generated tokens", ["model"], registry=registry,
        )
        self.routes = Counter(
            "tandem_frontend_routes_total",
            "Worker choices per request attempt: asked (waited for the router's answer) or predicted (started on "
            "the model's only worker while the Route was on its way)", ["model", "decision"], registry=registry,
        )
        self.route_mispredictions = Counter(
            "tandem_frontend_route_mispredictions_total",
            "Predicted routes whose Route answer named another worker, asked for a remote prefill, or failed "
            "(the request stayed where it started)",
            ["model"], registry=registry,
        )

    def count_request(self, model: str, endpoint: str, request_type: str, status: str) -> None:
        """Count a request that ended without reaching the pipeline (bad input, unknown model)."""
        self.requests.labels(model, endpoint, request_type, status).inc()

    def track(self, model: str, endpoint: str, request_type: str, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, model, endpoint, request_type, num_prompt_tokens)


class RequestTracker:
    """Timing of one request through the pipeline; ``finish`` must be called exactly once."""

    __slots__ = ("_metrics", "_labels", "_model", "_start", "_last", "num_output_tokens", "_done")

    def __init__(
        self, metrics: FrontendMetrics, model: str, endpoint: str, request_type: str, num_prompt_tokens: int
    ) -> None:
        self._metrics = metrics
        self._model = model
        self._labels = (model, endpoint, request_type)
        self._start = time.monotonic()
        self._last: float | None = None
        self.num_output_tokens = 0
        self._done = False
        metrics.inflight.labels(model).inc()
        metrics.input_sequence_tokens.labels(model).observe(num_prompt_tokens)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._metrics.time_to_first_token.labels(self._model).observe(now - self._start)
            # The first token's latency is TTFT; the rest of the delta (if a delta carried
            # several tokens) is spread evenly, as the worker emitted them in one step.
            num_gaps, gap_s = num_tokens - 1, 0.0
        else:
            num_gaps, gap_s = num_tokens, (now - self._last) / num_tokens
        histogram = self._metrics.inter_token_latency.labels(self._model)
        for _ in range(num_gaps):
            histogram.observe(gap_s)
        self._last = now
        self.num_output_tokens += num_tokens

    def finish(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        metrics, model = self._metrics, self._model
        metrics.inflight.labels(model).dec()
        metrics.requests.labels(*self._labels, status).inc()
        metrics.request_duration.labels(model).observe(time.monotonic() - self._start)
        metrics.output_sequence_tokens.labels(model).observe(self.num_output_tokens)
        metrics.output_tokens.labels(model).inc(self.num_output_tokens)
