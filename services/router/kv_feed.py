"""Feeds the KV router from the workers' registration streams: events, snapshots, progress, load.

The servicer hands each stream message here; the answers say when to ask a worker for a snapshot.
"""

from __future__ import annotations

import structlog

from services.router.kv_index import ApplyOutcome
from services.router.kv_metrics import KvMetrics
from services.router.kv_scorer import KvRouter
from tandem.kv.events import KvEvent, KvEventKind, KvSnapshot
from tandem.proto.router.v1 import router_pb2

log = structlog.get_logger("router")

_KINDS = {
    router_pb2.KV_EVENT_KIND_STORED: KvEventKind.STORED,
    router_pb2.KV_EVENT_KIND_REMOVED: KvEventKind.REMOVED,
    router_pb2.KV_EVENT_KIND_CLEARED: KvEventKind.CLEARED,
}


class KvFeed:
    """One per router. Single-threaded: called from the router's event loop only.

    ``approximate_only`` makes every worker approximate, even one that publishes events (to
    compare the modes, or when event streams are known to be unreliable).
    """

    def __init__(self, kv: KvRouter, metrics: KvMetrics, *, approximate_only: bool = False) -> None:
        self.kv = kv
        self._metrics = metrics
        self._approximate_only = approximate_only
        self._snapshot_parts: dict[str, list[int]] = {}

    def on_register(self, info: router_pb2.WorkerInfo) -> None:
        """A (re-)registration starts from an empty view; the worker's snapshot follows."""
        publishes = info.publishes_kv_events and not self._approximate_only
        self.kv.remove_worker(info.worker_id)
        self._snapshot_parts.pop(info.worker_id, None)
        self.kv.add_worker(info.worker_id, publishes_events=publishes)
        self._update_size()

    def on_removed(self, worker_id: str) -> None:
        self.kv.remove_worker(worker_id)
        self._snapshot_parts.pop(worker_id, None)
        self._update_size()
        log.info("worker's KV blocks dropped", worker_id=worker_id)

    def on_load(self, worker_id: str, num_kv_blocks_used: int, num_kv_blocks_total: int) -> None:
        self.kv.on_load_report(worker_id, num_kv_blocks_used)
        self.kv.approximate.set_capacity(worker_id, num_kv_blocks_total)

    def on_events(self, worker_id: str, batch: router_pb2.KvEventBatch) -> bool:
        """Apply a batch; True when a gap was found and the worker must send a snapshot."""
        if worker_id in self.kv.approximate:
            return False  # predicted from routing instead
        apply = self.kv.index.apply
        num_applied = 0
        ask_snapshot = False
        for message in batch.events:
            kind = _KINDS.get(message.kind)
            if kind is None:
                log.warning("KV event of unknown kind ignored", worker_id=worker_id, kind=message.kind)
                continue
            outcome = apply(worker_id, KvEvent(message.event_id, kind, tuple(message.block_hashes)))
            if outcome is ApplyOutcome.APPLIED:
                num_applied += 1
            elif outcome is ApplyOutcome.GAP:
                self._metrics.event_gaps.inc()
                ask_snapshot = True
                log.info("KV event gap; asking for a snapshot", worker_id=worker_id,
                         expected=self.kv.index.last_event_id(worker_id) + 1, got=message.event_id)
        self._metrics.events_applied.inc(num_applied)
        self._update_size()
        return ask_snapshot

    def on_snapshot(self, worker_id: str, chunk: router_pb2.KvSnapshotChunk) -> bool:
        """Collect a snapshot's chunks and apply it; True if it is still behind (ask again)."""
        if worker_id in self.kv.approximate:
            return False
        parts = self._snapshot_parts.setdefault(worker_id, [])
        parts.extend(chunk.block_hashes)
        if chunk.more:
            return False
        del self._snapshot_parts[worker_id]
        outcome = self.kv.index.apply_snapshot(worker_id, KvSnapshot(chunk.last_event_id, tuple(parts)))
        self._metrics.resyncs.inc()
        self._update_size()
        log.debug("KV snapshot applied", worker_id=worker_id, num_blocks=len(parts),
                  last_event_id=chunk.last_event_id)
        return outcome is ApplyOutcome.GAP

    def on_progress(self, worker_id: str, progress: router_pb2.RequestProgress) -> None:
        # Matched on the worker too: a migrated request's first attempt ends after its re-route.
        for request_id in progress.first_token_request_ids:
            self.kv.on_first_token(request_id, worker_id)
        for request_id in progress.finished_request_ids:
            self.kv.on_finished(request_id, worker_id)

    def _update_size(self) -> None:
        self._metrics.index_blocks.set(self.kv.index.num_blocks)
        self._metrics.index_entries.set(self.kv.index.num_entries)
