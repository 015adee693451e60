"""KV events: what a worker's cache stored, removed or cleared, numbered so the router sees gaps.

``KvEventLog`` sits between an engine's block pool (which calls ``record`` from its step thread)
and the asyncio side (which streams events to the router and answers snapshot requests).
"""

from __future__ import annotations

import asyncio
import enum
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class KvEventKind(enum.Enum):
    STORED = "stored"  # blocks became reusable under these hashes
    REMOVED = "removed"  # blocks were evicted; their hashes no longer hit
    CLEARED = "cleared"  # the whole prefix cache was dropped (no hashes)


@dataclass(slots=True, frozen=True)
class KvEvent:
    """One change to a worker's prefix cache.

    ``event_id`` starts at 1 and grows by exactly one per event of a worker, so a receiver
    that sees ``n + 2`` after ``n`` knows it missed one and must resynchronise.
    """

    event_id: int
    kind: KvEventKind
    block_hashes: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class KvSnapshot:
    """Every block hash cached on a worker after applying events up to ``last_event_id``."""

    last_event_id: int
    block_hashes: tuple[int, ...]


@runtime_checkable
class KvEventSource(Protocol):
    """An engine that can publish its prefix cache; one that cannot is routed approximately."""

    def kv_events(self) -> KvSubscription:
        """Events recorded from this call on, until closed (``KvEventLog.subscribe``)."""
        ...

    def kv_snapshot(self) -> KvSnapshot:
        """Every cached block hash and the id of the last event included; cheap enough per resync."""
        ...


class KvEventLog:
    """Numbers a block pool's events, mirrors its cached set and fans events out to subscribers.

    Thread-safe: ``record`` runs on an engine's step thread, ``snapshot`` and ``subscribe`` on an
    event loop. The log keeps its own copy of the cached hashes (rather than reading the pool's)
    so a snapshot and its ``last_event_id`` are taken under one lock and always agree.

    A subscriber that falls ``max_queued`` events behind loses the newest ones instead of growing
    without bound; the receiver then sees a gap in the ids and asks for a snapshot.
    """

    def __init__(self, max_queued: int = 10_000) -> None:
        if max_queued < 1:
            raise ValueError(f"invalid KV event setting max_queued: must be >= 1, got {max_queued}")
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._last_event_id = 0
        self._cached: set[int] = set()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[KvEvent]]] = []
        self.num_dropped = 0  # events lost to slow subscribers, for the worker's metrics

    @property
    def last_event_id(self) -> int:
        return self._last_event_id

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def record(self, kind: str | KvEventKind, block_hashes: Iterable[int]) -> KvEvent:
        """Number and publish one change; the signature matches ``BlockManager``'s ``on_event``."""
        kind = KvEventKind(kind)
        hashes = tuple(block_hashes) if kind is not KvEventKind.CLEARED else ()
        with self._lock:
            self._last_event_id += 1
            event = KvEvent(self._last_event_id, kind, hashes)
            if kind is KvEventKind.STORED:
                self._cached.update(hashes)
            elif kind is KvEventKind.REMOVED:
                self._cached.difference_update(hashes)
            else:
                self._cached.clear()
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(self._offer, queue, event)
            except RuntimeError:  # that loop closed; its subscriber is gone
                pass
        return event

    def snapshot(self) -> KvSnapshot:
        with self._lock:
            return KvSnapshot(self._last_event_id, tuple(self._cached))

    def subscribe(self) -> KvSubscription:
        """Events recorded from this call on, in order, until the subscription is closed.

        Registered at once (not at the first ``anext``), so a ``snapshot()`` taken right after
        subscribing misses nothing: events up to its ``last_event_id`` are in it and the
        subscription's later ones follow on. Call from the loop that will iterate.
        """
        queue: asyncio.Queue[KvEvent] = asyncio.Queue()
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subscribers.append(entry)
        return KvSubscription(self, entry)

    def _unsubscribe(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[KvEvent]]) -> None:
        with self._lock:
            if entry in self._subscribers:
                self._subscribers.remove(entry)

    def _offer(self, queue: asyncio.Queue[KvEvent], event: KvEvent) -> None:
        if queue.qsize() >= self._max_queued:
            self.num_dropped += 1
            return
        queue.put_nowait(event)


class KvSubscription:
    """An async iterator over one subscriber's events; ``aclose()`` (or ``close()``) ends it."""

    def __init__(self, log: KvEventLog,
                 entry: tuple[asyncio.AbstractEventLoop, asyncio.Queue[KvEvent]]) -> None:
        self._log = log
        self._entry = entry

    def __aiter__(self) -> KvSubscription:
        return self

    async def __anext__(self) -> KvEvent:
        return await self._entry[1].get()

    def get_nowait(self) -> KvEvent | None:
        """The next queued event, or None; lets a publisher batch what has piled up."""
        queue = self._entry[1]
        return None if queue.empty() else queue.get_nowait()

    def close(self) -> None:
        self._log._unsubscribe(self._entry)

    async def aclose(self) -> None:
        self.close()
