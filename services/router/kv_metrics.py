"""The KV-aware router's Prometheus metrics, registered on the router's own registry (none at import)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_HIT_RATE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


class KvMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.predicted_hit_rate = Histogram(
            "tandem_router_kv_predicted_hit_rate",
            "Per routed request: prompt blocks the chosen worker holds / prompt blocks (kv policy).",
            buckets=_HIT_RATE_BUCKETS, registry=registry,
        )
        self.routed_requests = Counter(
            "tandem_router_kv_routed_requests", "Requests the kv policy sent to each worker.",
            ["worker_id"], registry=registry,
        )
        self.routed_cached_blocks = Counter(
            "tandem_router_kv_routed_cached_blocks",
            "Prompt blocks predicted cached on the chosen worker, summed per worker.",
            ["worker_id"], registry=registry,
        )
        self.events_applied = Counter(
            "tandem_router_kv_events_applied", "KV events applied to the prefix index.", registry=registry,
        )
        self.event_gaps = Counter(
            "tandem_router_kv_event_gaps", "Gaps found in a worker's KV event ids (each asks for a snapshot).",
            registry=registry,
        )
        self.resyncs = Counter(
            "tandem_router_kv_resyncs", "Worker KV snapshots applied to the prefix index.", registry=registry,
        )
        self.index_blocks = Gauge(
            "tandem_router_kv_index_blocks", "Distinct block hashes in the prefix index (events and predicted).",
            registry=registry,
        )
        self.index_entries = Gauge(
            "tandem_router_kv_index_entries", "(worker, block) pairs in the prefix index.", registry=registry,
        )
