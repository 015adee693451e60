"""The router's view of its workers: who is registered, what each last reported, who is healthy.

Backends (embedded now, Consul later) implement ``WorkerRegistry``; routing only reads snapshots.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tandem.procinfo import ProcessIdentity


class WorkerRole(enum.Enum):
    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(slots=True, frozen=True)
class WorkerInfo:
    """What a worker says about itself when it registers; fixed for the registration's lifetime."""

    worker_id: str
    role: WorkerRole
    address: str  # host:port of the worker's gRPC server
    model: str
    max_model_len: int = 0
    block_size: int = 0
    process: ProcessIdentity | None = None  # set when the worker said which OS process it is


@dataclass(slots=True, frozen=True)
class WorkerLoad:
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_free_queue_slots: int = 0


@dataclass(slots=True, frozen=True)
class WorkerSnapshot:
    """One worker as the routing policy sees it at decision time."""

    info: WorkerInfo
    load: WorkerLoad = field(default_factory=WorkerLoad)
    # Requests routed here after the last load report, which that report cannot include yet.
    num_routed_since_report: int = 0
    healthy: bool = True

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


class WorkerRegistry(Protocol):
    """What routing needs from a registry backend."""

    def snapshot(self) -> list[WorkerSnapshot]:
        """All known workers, healthy or not, as of now. Called once per routing decision."""
        ...

    def note_routed(self, worker_id: str) -> None:
        """Count a request sent to ``worker_id`` until the worker's next load report covers it."""


@dataclass(slots=True)
class _Entry:
    info: WorkerInfo
    registration_id: int
    last_seen_s: float
    load: WorkerLoad = field(default_factory=WorkerLoad)
    num_routed_since_report: int = 0


class EmbeddedRegistry:
    """Workers register over a stream to the router itself; the stream's life is the entry's life.

    A worker whose stream has been silent for ``stale_after_s`` stays listed but is reported
    unhealthy, so a stalled stream stops receiving requests before TCP keepalive notices.
    Single-threaded: called only from the router's event loop.
    """

    def __init__(self, stale_after_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._stale_after_s = stale_after_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._next_registration_id = 1

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._entries

    def register(self, info: WorkerInfo) -> int:
        """Add or replace ``info.worker_id``; returns the id that later calls must present.

        A worker that restarts re-registers before its old stream has been noticed as dead;
        the newer registration wins and the old stream's later calls are ignored.
        """
        registration_id = self._next_registration_id
        self._next_registration_id += 1
        self._entries[info.worker_id] = _Entry(info, registration_id, self._clock())
        return registration_id

    def report_load(self, worker_id: str, registration_id: int, load: WorkerLoad) -> bool:
        entry = self._current(worker_id, registration_id)
        if entry is None:
            return False
        entry.load = load
        entry.num_routed_since_report = 0
        entry.last_seen_s = self._clock()
        return True

    def is_current(self, worker_id: str, registration_id: int) -> bool:
        """Whether this registration still owns the entry (a newer one of the worker has not replaced it)."""
        return self._current(worker_id, registration_id) is not None

    def remove(self, worker_id: str, registration_id: int) -> bool:
        """Remove the entry if it still belongs to this registration (not a newer one)."""
        if self._current(worker_id, registration_id) is None:
            return False
        del self._entries[worker_id]
        return True

    def note_routed(self, worker_id: str) -> None:
        entry = self._entries.get(worker_id)
        if entry is not None:
            entry.num_routed_since_report += 1

    def snapshot(self) -> list[WorkerSnapshot]:
        now = self._clock()
        return [
            WorkerSnapshot(
                info=entry.info,
                load=entry.load,
                num_routed_since_report=entry.num_routed_since_report,
                healthy=now - entry.last_seen_s <= self._stale_after_s,
            )
            for entry in self._entries.values()
        ]

    def _current(self, worker_id: str, registration_id: int) -> _Entry | None:
        entry = self._entries.get(worker_id)
        if entry is None or entry.registration_id != registration_id:
            return None
        return entry
