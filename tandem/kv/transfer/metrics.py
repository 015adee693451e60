"""Prometheus metrics of disaggregated prefill, built per worker on its registry (nothing at import time)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.kv.transfer.protocol import PullResult

_TRANSPORTS = ("grpc", "shm")
# A 256-token transfer of a small model takes about a millisecond; 8k tokens of a large one, seconds.
_DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_THROUGHPUT_BUCKETS_GBPS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)
LOCAL_REASONS = ("no_hint", "short_prompt", "pool_full", "prefill_failed", "import_failed", "prompt_logprobs")


class PullMetrics:
    """Decode side: where prompts were prefilled and how the KV came over."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.prefills = Counter("tandem_worker_prefills", "Prompts by where they were prefilled "
                                "(remote: on a prefill worker; local: here, with the reason).",
                                ["where", "reason"], registry=registry)
        self.bytes_received = Counter("tandem_kv_transfer_received_bytes", "KV bytes pulled from prefill workers.",
                                      ["transport"], registry=registry)
        self.duration = Histogram("tandem_kv_transfer_duration_seconds", "Time of one KV pull, all chunks.",
                                  ["transport"], buckets=_DURATION_BUCKETS_S, registry=registry)
        self.throughput = Histogram("tandem_kv_transfer_throughput_gbps", "GB/s of one KV pull.",
                                    ["transport"], buckets=_THROUGHPUT_BUCKETS_GBPS, registry=registry)
        self.chunk_retries = Counter("tandem_kv_transfer_chunk_retries", "Chunks asked for again (corrupt, "
                                     "missing or broken stream).", ["transport"], registry=registry)
        self.failures = Counter("tandem_kv_transfer_failures", "KV pulls given up (the prompt was then "
                                "prefilled here).", ["reason"], registry=registry)
        self.prefills.labels(where="remote", reason="")
        for reason in LOCAL_REASONS:
            self.prefills.labels(where="local", reason=reason)
        for transport in _TRANSPORTS:
            self.bytes_received.labels(transport=transport)
            self.chunk_retries.labels(transport=transport)

    def observe_pull(self, result: PullResult) -> None:
        self.bytes_received.labels(transport=result.transport).inc(result.num_bytes)
        self.chunk_retries.labels(transport=result.transport).inc(result.num_retried_chunks)
        if result.num_bytes:
            self.duration.labels(transport=result.transport).observe(result.duration_s)
            self.throughput.labels(transport=result.transport).observe(result.gigabytes_per_s)

    def observe_prefill(self, where: str, reason: str = "") -> None:
        self.prefills.labels(where=where, reason=reason).inc()


class ExportMetrics:
    """Prefill side: the prefill queue, leases and what was sent."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("tandem_prefill_requests", "Prefill calls by how they ended.", ["outcome"],
                                registry=registry)
        self.queue_depth = Gauge("tandem_prefill_queue_depth", "Prefill calls waiting or running.",
                                 registry=registry)
        self.leases_active = Gauge("tandem_kv_leases_active", "Prefilled requests whose blocks wait for a pull.",
                                   registry=registry)
        self.leased_blocks = Gauge("tandem_kv_leased_blocks", "KV blocks pinned under leases.", registry=registry)
        self.leases_ended = Counter("tandem_kv_leases_ended", "Leases ended, by why: released (acknowledged), "
                                    "expired, cancelled, shutdown.", ["reason"], registry=registry)
        self.bytes_sent = Counter("tandem_kv_transfer_sent_bytes", "KV bytes served to decode workers.",
                                  ["transport"], registry=registry)
        self.chunks_sent = Counter("tandem_kv_transfer_sent_chunks", "KV chunks served.", ["transport"],
                                   registry=registry)
        for outcome in ("ok", "finished", "rejected", "error", "cancelled"):
            self.requests.labels(outcome=outcome)
        for reason in ("released", "expired", "cancelled", "shutdown"):
            self.leases_ended.labels(reason=reason)
        for transport in _TRANSPORTS:
            self.bytes_sent.labels(transport=transport)
