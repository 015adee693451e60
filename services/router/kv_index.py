"""The router's prefix index: which worker holds which KV block, fed by the workers' KV events.

Answers one question per request: for the prompt's chained block hashes, how many leading
blocks does each worker already hold?
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from tandem.kv.events import KvEvent, KvEventKind, KvSnapshot


class ApplyOutcome(enum.Enum):
    APPLIED = "applied"
    STALE = "stale"  # an id at or below the last applied one (a replay): ignored
    GAP = "gap"  # ids were skipped: the worker must be resynchronised from a snapshot
    BUFFERED = "buffered"  # held until the pending snapshot arrives
    UNKNOWN_WORKER = "unknown_worker"


@dataclass(slots=True)
class _Worker:
    worker_id: str
    bit: int  # this worker's bit in every owner mask
    blocks: set[int] = field(default_factory=set)
    last_event_id: int = 0
    resyncing: bool = False
    # Events that arrived while a snapshot was awaited; those newer than it are replayed after it.
    pending: list[KvEvent] = field(default_factory=list)


class KvIndex:
    """block hash -> bitmask of the workers holding it, plus each worker's own set of hashes.

    The mask makes a prefix query one dict lookup and one AND per prompt block, for any number of
    workers, stopping at the first block no remaining worker holds. The per-worker sets make
    removing a worker and replacing its blocks from a snapshot proportional to its own blocks,
    not to the whole index. Single-threaded: called only from the router's event loop.
    """

    def __init__(self, max_pending_events: int = 10_000) -> None:
        self._owners: dict[int, int] = {}
        self._workers: dict[str, _Worker] = {}
        self._slot_ids: list[str | None] = []  # bit position -> worker id; freed slots are reused
        self._max_pending_events = max_pending_events

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held by at least one worker."""
        return len(self._owners)

    @property
    def num_entries(self) -> int:
        """(worker, block) pairs: a block held by two workers counts twice."""
        return sum(len(worker.blocks) for worker in self._workers.values())

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._workers

    def worker_ids(self) -> list[str]:
        return list(self._workers)

    def num_worker_blocks(self, worker_id: str) -> int:
        worker = self._workers.get(worker_id)
        return len(worker.blocks) if worker else 0

    def last_event_id(self, worker_id: str) -> int:
        worker = self._workers.get(worker_id)
        return worker.last_event_id if worker else 0

    def needs_resync(self, worker_id: str) -> bool:
        worker = self._workers.get(worker_id)
        return worker is not None and worker.resyncing

    def overlaps(self, block_hashes: Iterable[int], worker_ids: Collection[str] | None = None) -> dict[str, int]:
        """Number of leading blocks of ``block_hashes`` each worker holds (0 for unknown workers).

        ``block_hashes`` may be a lazy iterator: it is consumed only until every worker has
        missed, so an uncached prompt costs one hash and one lookup, not the whole prompt.
        """
        if worker_ids is None:
            wanted = list(self._workers)
        else:
            wanted = list(worker_ids)
        result = dict.fromkeys(wanted, 0)
        active = 0
        for worker_id in wanted:
            worker = self._workers.get(worker_id)
            if worker is not None:
                active |= worker.bit
        if not active:
            return result
        owners_get, slot_ids = self._owners.get, self._slot_ids
        depth = 0
        for block_hash in block_hashes:
            holders = owners_get(block_hash, 0) & active
            if holders != active:
                self._settle(active & ~holders, depth, result, slot_ids)
                active = holders
                if not active:
                    return result
            depth += 1
        self._settle(active, depth, result, slot_ids)
        return result

    @staticmethod
    def _settle(mask: int, depth: int, result: dict[str, int], slot_ids: list[str | None]) -> None:
        while mask:
            lowest = mask & -mask
            worker_id = slot_ids[lowest.bit_length() - 1]
            if worker_id is not None:
                result[worker_id] = depth
            mask ^= lowest

    # -- workers -------------------------------------------------------------------------------

    def add_worker(self, worker_id: str) -> None:
        """Start tracking a worker (idempotent). Its first event must carry id 1, or it is a gap."""
        if worker_id in self._workers:
            return
        try:
            slot = self._slot_ids.index(None)
            self._slot_ids[slot] = worker_id
        except ValueError:
            slot = len(self._slot_ids)
            self._slot_ids.append(worker_id)
        self._workers[worker_id] = _Worker(worker_id, 1 << slot)

    def remove_worker(self, worker_id: str) -> int:
        """Drop a worker that left and every block it held; returns how many it held."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return 0
        num_blocks = len(worker.blocks)
        self._unset(worker.bit, worker.blocks)
        self._slot_ids[worker.bit.bit_length() - 1] = None
        return num_blocks

    # -- events --------------------------------------------------------------------------------

    def apply(self, worker_id: str, event: KvEvent) -> ApplyOutcome:
        """Apply one event of ``worker_id`` in id order; on ``GAP`` the caller requests a snapshot."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return ApplyOutcome.UNKNOWN_WORKER
        if worker.resyncing:
            if len(worker.pending) < self._max_pending_events:
                worker.pending.append(event)
            # else: dropped; the replay after the snapshot then finds a gap and asks again
            return ApplyOutcome.BUFFERED
        expected = worker.last_event_id + 1
        if event.event_id != expected:
            if event.event_id < expected:
                return ApplyOutcome.STALE
            worker.resyncing = True
            worker.pending.append(event)
            return ApplyOutcome.GAP
        worker.last_event_id = event.event_id
        if event.kind is KvEventKind.STORED:  # the hot path, inlined: millions of these per second
            owners, bit = self._owners, worker.bit
            get = owners.get
            for block_hash in event.block_hashes:
                owners[block_hash] = get(block_hash, 0) | bit
            worker.blocks.update(event.block_hashes)
        else:
            self._apply_change(worker, event.kind, event.block_hashes)
        return ApplyOutcome.APPLIED

    def apply_snapshot(self, worker_id: str, snapshot: KvSnapshot) -> ApplyOutcome:
        """Replace a worker's blocks with ``snapshot``, then replay the events buffered since.

        Returns ``GAP`` when the buffered events still do not follow on from the snapshot
        (some were dropped): the caller asks for another snapshot.
        """
        worker = self._workers.get(worker_id)
        if worker is None:
            return ApplyOutcome.UNKNOWN_WORKER
        new_blocks = set(snapshot.block_hashes)
        self._unset(worker.bit, worker.blocks - new_blocks)
        self._set(worker.bit, new_blocks - worker.blocks)
        worker.blocks = new_blocks
        worker.last_event_id = snapshot.last_event_id
        worker.resyncing = False
        pending, worker.pending = sorted(worker.pending, key=lambda event: event.event_id), []
        outcome = ApplyOutcome.APPLIED
        for event in pending:
            if worker.resyncing:
                worker.pending.append(event)
                continue
            if self.apply(worker_id, event) is ApplyOutcome.GAP:
                outcome = ApplyOutcome.GAP
        return outcome

    # -- direct changes (approximate mode and tests: no event ids) -----------------------------

    def store(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._apply_change(worker, KvEventKind.STORED, tuple(block_hashes))

    def remove(self, worker_id: str, block_hashes: Iterable[int]) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._apply_change(worker, KvEventKind.REMOVED, tuple(block_hashes))

    def clear(self, worker_id: str) -> None:
        worker = self._workers.get(worker_id)
        if worker is not None:
            self._apply_change(worker, KvEventKind.CLEARED, ())

    # -- internals -----------------------------------------------------------------------------

    def _apply_change(self, worker: _Worker, kind: KvEventKind, block_hashes: tuple[int, ...]) -> None:
        if kind is KvEventKind.STORED:
            self._set(worker.bit, block_hashes)
            worker.blocks.update(block_hashes)
        elif kind is KvEventKind.REMOVED:
            owners, blocks, keep = self._owners, worker.blocks, ~worker.bit
            for block_hash in block_hashes:
                # Only hashes this worker holds: a stray removal must not touch other workers' bits.
                if block_hash in blocks:
                    blocks.remove(block_hash)
                    holders = owners[block_hash] & keep
                    if holders:
                        owners[block_hash] = holders
                    else:
                        del owners[block_hash]
        else:
            self._unset(worker.bit, worker.blocks)
            worker.blocks = set()

    def _set(self, bit: int, block_hashes: Iterable[int]) -> None:
        owners = self._owners
        get = owners.get
        for block_hash in block_hashes:
            owners[block_hash] = get(block_hash, 0) | bit

    def _unset(self, bit: int, block_hashes: Iterable[int]) -> None:
        owners = self._owners
        keep = ~bit
        for block_hash in block_hashes:
            holders = owners[block_hash] & keep
            if holders:
                owners[block_hash] = holders
            else:
                del owners[block_hash]
