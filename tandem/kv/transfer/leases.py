"""Leases on a prefill worker's pinned KV blocks: freed on ack, on expiry, or on cancellation.

Single-threaded: used from the prefill worker's event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

log = structlog.get_logger("prefill")

# Why a lease ended; also the metrics label.
RELEASED = "released"  # the decode worker acknowledged (ReleaseKv)
EXPIRED = "expired"  # nobody released it in time
CANCELLED = "cancelled"  # the Prefill call was cancelled before its answer arrived
SHUTDOWN = "shutdown"


@dataclass(slots=True)
class Lease:
    transfer_id: str  # also the engine request id that pinned the blocks
    request_id: str  # the client's request id, for logs
    block_ids: list[int]
    num_tokens: int
    expires_at_s: float
    num_active_pulls: int = 0


FreeCallback = Callable[[Lease, str], Awaitable[None]]


class LeaseTable:
    """Pinned transfers by id. ``on_free(lease, reason)`` runs exactly once per lease.

    A lease being pulled does not expire mid-stream (the puller's deadline bounds the pull);
    it expires at the first check after its last pull ends.
    """

    def __init__(self, lease_s: float, on_free: FreeCallback, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s = lease_s
        self._on_free = on_free
        self._clock = clock
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._leases

    @property
    def num_blocks(self) -> int:
        return sum(len(lease.block_ids) for lease in self._leases.values())

    def add(self, transfer_id: str, request_id: str, block_ids: list[int], num_tokens: int) -> Lease:
        if transfer_id in self._leases:
            raise ValueError(f"transfer {transfer_id!r} already holds a lease")
        lease = Lease(transfer_id, request_id, list(block_ids), num_tokens, self._clock() + self.lease_s)
        self._leases[transfer_id] = lease
        return lease

    def get(self, transfer_id: str) -> Lease | None:
        return self._leases.get(transfer_id)

    @contextmanager
    def pulling(self, lease: Lease) -> Iterator[None]:
        """Mark ``lease`` busy for one PullKv call."""
        lease.num_active_pulls += 1
        try:
            yield
        finally:
            lease.num_active_pulls -= 1

    async def release(self, transfer_id: str, reason: str) -> bool:
        """Free the lease's blocks now; False when it is unknown (already freed)."""
        lease = self._leases.pop(transfer_id, None)
        if lease is None:
            return False
        try:
            await self._on_free(lease, reason)
        except Exception:  # one failed release must not stop the others (expiry loop, shutdown)
            log.exception("releasing KV lease failed", transfer_id=transfer_id, reason=reason)
        return True

    async def expire(self) -> int:
        """Free every lease past its expiry that is not being pulled; returns how many."""
        now = self._clock()
        due = [lease.transfer_id for lease in self._leases.values()
               if lease.expires_at_s <= now and lease.num_active_pulls == 0]
        for transfer_id in due:
            lease = self._leases.get(transfer_id)
            if lease is not None:
                log.info("KV lease expired; freeing blocks", transfer_id=transfer_id, request_id=lease.request_id,
                         num_blocks=len(lease.block_ids))
            await self.release(transfer_id, EXPIRED)
        return len(due)

    async def run_expiry(self, interval_s: float) -> None:
        """The expiry loop; a task of the prefill worker, cancelled on shutdown."""
        while True:
            await asyncio.sleep(interval_s)
            await self.expire()

    async def release_all(self, reason: str = SHUTDOWN) -> None:
        for transfer_id in list(self._leases):
            await self.release(transfer_id, reason)
