"""What a decode worker tells the router besides its load: KV cache events and request progress.

Both become RegisterWorker messages placed in the registration stream's outbox, so they share its
order: a snapshot always lands between the events it includes and the ones after it.
"""

from __future__ import annotations

import asyncio

import structlog

from tandem.kv.events import KvEvent, KvEventKind, KvEventSource, KvSubscription
from tandem.proto.router.v1 import router_pb2

log = structlog.get_logger("decode")

_KINDS = {
    KvEventKind.STORED: router_pb2.KV_EVENT_KIND_STORED,
    KvEventKind.REMOVED: router_pb2.KV_EVENT_KIND_REMOVED,
    KvEventKind.CLEARED: router_pb2.KV_EVENT_KIND_CLEARED,
}
Outbox = asyncio.Queue[router_pb2.RegisterWorkerRequest]
# 8 bytes a hash: 64k hashes keep a message near 0.5 MiB, far below gRPC's 4 MiB default.
MAX_HASHES_PER_MESSAGE = 65_536
# Beyond this many unsent messages the router is not keeping up: drop events (it sees the gap
# and asks for a snapshot) rather than buffering without bound.
MAX_OUTBOX = 1_000
# KV events and progress notices wait this long before they are queued for the router, and leave
# together: they arise at a step's end, just when its tokens go to the frontends, and written at
# once each router message took the worker's loop (and a core) from those. The router's view lags
# by as much, which costs routing nothing.
HOLD_S = 0.005


def snapshot_messages(source: KvEventSource) -> list[router_pb2.RegisterWorkerRequest]:
    """The engine's cached blocks as one or more ``kv_snapshot`` messages."""
    snapshot = source.kv_snapshot()
    hashes = snapshot.block_hashes
    chunks = [hashes[i : i + MAX_HASHES_PER_MESSAGE] for i in range(0, len(hashes), MAX_HASHES_PER_MESSAGE)] or [()]
    return [
        router_pb2.RegisterWorkerRequest(kv_snapshot=router_pb2.KvSnapshotChunk(
            last_event_id=snapshot.last_event_id, block_hashes=chunk, more=n < len(chunks) - 1))
        for n, chunk in enumerate(chunks)
    ]


def _event_to_proto(event: KvEvent) -> router_pb2.KvEvent:
    return router_pb2.KvEvent(event_id=event.event_id, kind=_KINDS[event.kind], block_hashes=event.block_hashes)


class KvPublisher:
    """Streams one engine's KV events into one registration stream's outbox while it is open.

    ``open`` subscribes and then queues a snapshot, so the router starts complete without waiting
    for a gap; events already in the snapshot are skipped by the router as stale.
    """

    def __init__(self, source: KvEventSource, outbox: Outbox) -> None:
        self._source = source
        self._outbox = outbox
        self._subscription: KvSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    def open(self) -> None:
        self._subscription = self._source.kv_events()
        self.send_snapshot()
        self._task = asyncio.create_task(self._pump(self._subscription), name="kv-events")

    def send_snapshot(self) -> None:
        for message in snapshot_messages(self._source):
            self._outbox.put_nowait(message)  # never dropped: it is what repairs a gap

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._subscription is not None:
            self._subscription.close()

    async def _pump(self, subscription: KvSubscription) -> None:
        dropping = False
        while True:
            events = [await anext(subscription)]
            await asyncio.sleep(HOLD_S)
            num_hashes = len(events[0].block_hashes)
            # Batch whatever piled up while waiting: one message per step rather than per event.
            while num_hashes < MAX_HASHES_PER_MESSAGE and (event := subscription.get_nowait()) is not None:
                events.append(event)
                num_hashes += len(event.block_hashes)
            if self._outbox.qsize() >= MAX_OUTBOX:
                if not dropping:
                    log.warning("router is not keeping up; dropping KV events until it asks for a snapshot")
                dropping = True
                continue
            dropping = False
            batch = router_pb2.KvEventBatch(events=[_event_to_proto(event) for event in events])
            self._outbox.put_nowait(router_pb2.RegisterWorkerRequest(kv_events=batch))


class RequestProgress:
    """Collects first-token and finish notices from the servicer and sends them in batches.

    Notices raised within HOLD_S of the first go out as one message. With no stream attached
    (not registered yet, or reconnecting) they are dropped: the router expires them itself.
    """

    def __init__(self) -> None:
        self._first_token_ids: list[str] = []
        self._finished_ids: list[str] = []
        self._outbox: Outbox | None = None
        self._flush_scheduled = False

    def attach(self, outbox: Outbox | None) -> None:
        self._outbox = outbox
        self._first_token_ids.clear()
        self._finished_ids.clear()

    def first_token(self, request_id: str) -> None:
        self._add(self._first_token_ids, request_id)

    def finished(self, request_id: str) -> None:
        self._add(self._finished_ids, request_id)

    def _add(self, ids: list[str], request_id: str) -> None:
        if self._outbox is None or not request_id:
            return
        ids.append(request_id)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(HOLD_S, self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._outbox is not None and (self._first_token_ids or self._finished_ids):
            self._outbox.put_nowait(router_pb2.RegisterWorkerRequest(progress=router_pb2.RequestProgress(
                first_token_request_ids=self._first_token_ids, finished_request_ids=self._finished_ids)))
        self._first_token_ids, self._finished_ids = [], []
