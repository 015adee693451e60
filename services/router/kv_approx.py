"""Approximate mode: predict the cache of a worker that publishes no KV events from routing decisions.

A request routed to a worker leaves its prompt's blocks there; the prediction forgets them after
a TTL (the worker may have evicted them by then) or when the predicted cache outgrows the pool.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from services.router.kv_index import KvIndex


class ApproximateCache:
    """Writes predicted blocks into the shared ``KvIndex``, so one prefix walk covers both kinds.

    Entries are kept per worker in least-recently-routed order with an expiry time: a prefix
    used again is refreshed, and expiry or the capacity limit drops the stalest first.
    Single-threaded: the router's event loop only.
    """

    def __init__(self, index: KvIndex, ttl_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl_s > 0:
            raise ValueError(f"invalid router setting kv_approx_ttl_s: must be > 0, got {ttl_s}")
        self._index = index
        self._ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[str, OrderedDict[int, float]] = {}
        self._capacity: dict[str, int | None] = {}

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._expiry

    def add_worker(self, worker_id: str, capacity_blocks: int | None = None) -> None:
        """Predict this worker's cache from now on; ``capacity_blocks`` is its KV pool size."""
        self._index.add_worker(worker_id)
        self._expiry.setdefault(worker_id, OrderedDict())
        self._capacity[worker_id] = capacity_blocks or None

    def set_capacity(self, worker_id: str, capacity_blocks: int) -> None:
        """Learned from load reports; takes effect at the worker's next routed request."""
        if worker_id in self._capacity:
            self._capacity[worker_id] = capacity_blocks or None

    def remove_worker(self, worker_id: str) -> None:
        self._expiry.pop(worker_id, None)
        self._capacity.pop(worker_id, None)
        self._index.remove_worker(worker_id)

    def on_routed(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        """The worker will hold these blocks once it has run the request."""
        entries = self._expiry.get(worker_id)
        if entries is None:
            return
        expires_s = self._clock() + self._ttl_s
        new: list[int] = []
        for block_hash in block_hashes:
            if block_hash in entries:
                entries.move_to_end(block_hash)
            else:
                new.append(block_hash)
            entries[block_hash] = expires_s
        self._index.store(worker_id, new)
        capacity = self._capacity.get(worker_id)
        if capacity is not None and len(entries) > capacity:
            self._index.remove(worker_id, [entries.popitem(last=False)[0]
                                           for _ in range(len(entries) - capacity)])

    def expire(self) -> int:
        """Forget predictions past their TTL; returns how many blocks were dropped."""
        now = self._clock()
        num_dropped = 0
        for worker_id, entries in self._expiry.items():
            expired: list[int] = []
            while entries:
                block_hash, expires_s = next(iter(entries.items()))
                if expires_s > now:
                    break
                entries.popitem(last=False)
                expired.append(block_hash)
            if expired:
                self._index.remove(worker_id, expired)
                num_dropped += len(expired)
        return num_dropped
