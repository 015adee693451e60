"""The frontend's bounded queue: at most ``max_inflight`` requests at the workers, at most
``max_queued`` more waiting for a slot; beyond that a request is refused at once (503 + Retry-After,
RESOURCE_EXHAUSTED) instead of piling up until every client times out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from tandem.errors import ResourceExhausted

QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
WORKERS_FULL = "workers_full"


class Admission:
    """FIFO admission (asyncio.Semaphore wakes waiters in order); one per frontend process."""

    def __init__(self, max_inflight: int, max_queued: int, queue_timeout_s: float,
                 on_reject: Callable[[str], None] = lambda reason: None,
                 on_queue_change: Callable[[int], None] = lambda num_queued: None) -> None:
        if max_inflight < 1:
            raise ValueError(f"invalid frontend setting max_inflight_requests: must be >= 1, got {max_inflight}")
        if max_queued < 0:
            raise ValueError(f"invalid frontend setting max_queued_requests: must be >= 0, got {max_queued}")
        if not queue_timeout_s > 0:
            raise ValueError(f"invalid frontend setting queue_timeout_s: must be > 0, got {queue_timeout_s}")
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(max_inflight)
        self._num_queued = 0
        self._on_reject = on_reject
        self._on_queue_change = on_queue_change

    @property
    def num_queued(self) -> int:
        return self._num_queued

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_inflight`` slots for the body; raises ResourceExhausted when full."""
        if self._slots.locked() or self._num_queued:
            await self._wait_in_queue()
        else:
            await self._slots.acquire()  # free: returns at once
        try:
            yield
        finally:
            self._slots.release()

    async def _wait_in_queue(self) -> None:
        if self._num_queued >= self.max_queued:
            self._on_reject(QUEUE_FULL)
            raise ResourceExhausted(
                f"the server is at capacity ({self.max_inflight} requests running, {self._num_queued} queued); "
                "retry later")
        self._num_queued += 1
        self._on_queue_change(self._num_queued)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            self._on_reject(QUEUE_TIMEOUT)
            raise ResourceExhausted(
                f"the server is at capacity: no slot freed within {self.queue_timeout_s:g} s; retry later") from None
        finally:
            self._num_queued -= 1
            self._on_queue_change(self._num_queued)
