"""Shared-memory segments for the same-host KV path: files under /dev/shm, mapped by both workers.

The prefill worker owns every segment (creates, reuses, unlinks); the decode worker only maps
them read-only. Segments are reused across transfers and the decode side keeps its mappings,
so steady-state transfers touch no fresh pages (first-touch page faults cost as much as a copy).
Plain files rather than ``multiprocessing.shared_memory``, whose resource tracker would unlink
a segment when the *reader* exits.
"""

from __future__ import annotations

import mmap
import os
import re
from collections import OrderedDict
from pathlib import Path

import structlog

from tandem.kv.transfer.sweep import owner_token

log = structlog.get_logger(__name__)

_NAME_PREFIX = "tandem-kv-"
_VALID_NAME = re.compile(r"^tandem-kv-[A-Za-z0-9-]{1,64}$")
_ROUND_BYTES = 1024 * 1024


class Segment:
    """One mapped file under ``shm_dir``."""

    def __init__(self, path: Path, size: int, *, create: bool, populate: bool = False, writable: bool = False) -> None:
        """``populate`` maps every page now (a KV pool: faulting pages in one by one during the
        transfers that first touch them cost as much as copying them). An existing file is mapped
        read-only unless ``writable`` (a worker's helper process writing into the worker's pool)."""
        self.path = path
        self.name = path.name
        self.size = size
        writable = writable or create
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL if create else (os.O_RDWR if writable else os.O_RDONLY)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._map = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside segment {self.name} ({self.size} bytes)")
        return memoryview(self._map)[offset : offset + length]

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass


class SegmentPool:
    """Prefill side: segments by transfer, and a free list kept for reuse up to ``max_free_bytes``."""

    def __init__(self, shm_dir: str, max_free_bytes: int) -> None:
        self.shm_dir = Path(shm_dir)
        self.max_free_bytes = max_free_bytes
        self._token = owner_token()  # names say who made them: see sweep.py
        self._counter = 0
        self._in_use: dict[str, Segment] = {}
        self._free: list[Segment] = []

    @property
    def num_bytes(self) -> int:
        return sum(s.size for s in self._in_use.values()) + sum(s.size for s in self._free)

    def acquire(self, transfer_id: str, size: int) -> Segment:
        """The segment holding ``transfer_id``'s chunks: its current one if big enough, else a reused or new one."""
        current = self._in_use.get(transfer_id)
        if current is not None and current.size >= size:
            return current
        if current is not None:
            self._put_back(self._in_use.pop(transfer_id))
        # The smallest free segment that fits, unless it would waste more than it holds.
        fits = sorted((s for s in self._free if size <= s.size <= 2 * size), key=lambda s: s.size)
        if fits:
            segment = fits[0]
            self._free.remove(segment)
        else:
            self._counter += 1
            rounded = -(-size // _ROUND_BYTES) * _ROUND_BYTES
            segment = Segment(self.shm_dir / f"{_NAME_PREFIX}{self._token}-{self._counter}", rounded, create=True)
        self._in_use[transfer_id] = segment
        return segment

    def release(self, transfer_id: str) -> None:
        segment = self._in_use.pop(transfer_id, None)
        if segment is not None:
            self._put_back(segment)

    def _put_back(self, segment: Segment) -> None:
        self._free.append(segment)
        while self._free and sum(s.size for s in self._free) > self.max_free_bytes:
            self._destroy(self._free.pop(0))  # oldest first

    def close(self) -> None:
        for segment in [*self._in_use.values(), *self._free]:
            self._destroy(segment)
        self._in_use.clear()
        self._free.clear()

    @staticmethod
    def _destroy(segment: Segment) -> None:
        segment.close()
        try:
            segment.path.unlink()
        except FileNotFoundError:
            pass


class SegmentReader:
    """Decode side: read-only mappings of the prefill workers' segments, least recently used first out."""

    def __init__(self, shm_dir: str, max_mappings: int = 16) -> None:
        self.shm_dir = Path(shm_dir)
        self.max_mappings = max_mappings
        self._maps: OrderedDict[str, Segment] = OrderedDict()

    def view(self, name: str, segment_size: int, offset: int, length: int, *, populate: bool = False) -> memoryview:
        """Bytes [offset, offset+length) of segment ``name``; raises OSError when it cannot be opened.
        ``populate``: map all its pages when it is first mapped (a peer's KV pool)."""
        if not _VALID_NAME.match(name):
            raise ValueError(f"not a KV segment name: {name!r}")
        segment = self._maps.get(name)
        if segment is None or segment.size != segment_size:
            if segment is not None:
                segment.close()
            segment = Segment(self.shm_dir / name, segment_size, create=False, populate=populate)
            self._maps[name] = segment
            while len(self._maps) > self.max_mappings:
                _, oldest = self._maps.popitem(last=False)
                oldest.close()
        self._maps.move_to_end(name)
        return segment.view(offset, length)

    def close(self) -> None:
        for segment in self._maps.values():
            segment.close()
        self._maps.clear()
