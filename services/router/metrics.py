"""The router's Prometheus metrics, built per instance on a given registry (nothing at import time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Decisions are in-memory and take microseconds; the upper buckets catch event-loop stalls.
_DECISION_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)

OUTCOMES = ("routed", "unavailable", "invalid")


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.registered_workers = Gauge(
            "tandem_router_registered_workers", "Workers currently registered with the router.",
            registry=registry,
        )
        self.route_decisions = Counter(
            "tandem_router_route_decisions", "Route calls by outcome.", ["outcome"], registry=registry,
        )
        self.route_decision_duration = Histogram(
            "tandem_router_route_decision_duration_seconds", "Time to decide one Route call.",
            buckets=_DECISION_BUCKETS_S, registry=registry,
        )
        for outcome in OUTCOMES:  # export zeros so rate() works before the first failure
            self.route_decisions.labels(outcome=outcome)

    def observe_decision(self, outcome: str, duration_s: float) -> None:
        self.route_decisions.labels(outcome=outcome).inc()
        self.route_decision_duration.observe(duration_s)
