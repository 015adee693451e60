"""A KV pool in shared memory, so a decode worker on the same host copies blocks straight out of it.

The prefill worker's engine keeps its K and V tensors in one file under the shared-memory
directory (``SharedKvPool``); the handle of a prefilled request names that file and the request's
block ids, and the decode worker maps the file read-only and copies those blocks into its own
pool (``copy_blocks``): one copy, no staging buffer, no PullKv stream.

What keeps the bytes right: the blocks are pinned on the prefill worker until this decode worker
releases them, the lease expires, or the worker shuts down (and then no prefill runs that could
reuse them). The decode worker copies only before ``TransferHandle.lease_deadline_s``, a bound it
takes on its own monotonic clock before it sent Prefill, so the lease cannot have run out during
the copy; a copy that ends later is thrown away. Nothing crosses a network, so no checksum.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.engine.types import KVLayout
from tandem.kv.block_copy import gather_blocks, scatter_blocks
from tandem.kv.transfer.chunks import TORCH_DTYPES
from tandem.kv.transfer.shm import Segment, SegmentReader
from tandem.kv.transfer.sweep import owner_token

_NAME_PREFIX = "tandem-kv-pool-"


@dataclass(slots=True, frozen=True)
class SharedPoolInfo:
    """Where a shared pool is (the domain twin of ``kv.v1.SharedKvPool``)."""

    segment: str
    segment_size: int
    k_offset: int
    v_offset: int
    num_slots: int


def _pool_bytes(layout: KVLayout, num_slots: int) -> int:
    itemsize = torch.empty((), dtype=TORCH_DTYPES[layout.dtype]).element_size()
    return layout.num_layers * num_slots * layout.num_kv_heads * layout.head_dim * itemsize


def _tensor(buffer: memoryview, layout: KVLayout, num_slots: int) -> torch.Tensor:
    shape = (layout.num_layers, num_slots, layout.num_kv_heads, layout.head_dim)
    with warnings.catch_warnings():
        # A reader's mapping is read-only and only ever read from; torch warns about that once.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=TORCH_DTYPES[layout.dtype]).view(shape)


class SharedKvPool:
    """Prefill side: K and V of ``num_slots`` slots in a new shared-memory file, zeroed.

    The creator owns the file: ``close`` unlinks it (mappings already made stay valid).
    """

    def __init__(self, shm_dir: str, layout: KVLayout, num_slots: int) -> None:
        per_tensor = _pool_bytes(layout, num_slots)
        path = Path(shm_dir) / f"{_NAME_PREFIX}{owner_token()}"  # names say who made them: see sweep.py
        self.path = path
        self._segment = Segment(path, 2 * per_tensor, create=True, populate=True)  # reads as zeros
        self.k = _tensor(self._segment.view(0, per_tensor), layout, num_slots)
        self.v = _tensor(self._segment.view(per_tensor, per_tensor), layout, num_slots)
        self.info = SharedPoolInfo(self._segment.name, self._segment.size, 0, per_tensor, num_slots)

    def close(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def map_pool(reader: SegmentReader, info: SharedPoolInfo, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode side: read-only K and V tensors over a peer's pool (the mapping is cached by ``reader``).

    Raises ValueError when the description does not fit the layout, OSError when the file is gone.
    """
    per_tensor = _pool_bytes(layout, info.num_slots)
    if info.num_slots % layout.block_size or max(info.k_offset, info.v_offset) + per_tensor > info.segment_size:
        raise ValueError(f"shared pool {info.segment} does not hold {info.num_slots} slots of {layout}")
    k = _tensor(reader.view(info.segment, info.segment_size, info.k_offset, per_tensor, populate=True), layout,
                info.num_slots)
    v = _tensor(reader.view(info.segment, info.segment_size, info.v_offset, per_tensor), layout, info.num_slots)
    return k, v


def _runs(source_ids: Sequence[int], target_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """(source start, target start, length) of the stretches where both id lists count up by one."""
    runs: list[tuple[int, int, int]] = []
    for source, target in zip(source_ids, target_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == source and runs[-1][1] + runs[-1][2] == target:
            start_source, start_target, length = runs[-1]
            runs[-1] = (start_source, start_target, length + 1)
        else:
            runs.append((source, target, 1))
    return runs


def copy_blocks(source_k: torch.Tensor, source_v: torch.Tensor, source_ids: Sequence[int],
                target_k: torch.Tensor, target_v: torch.Tensor, target_ids: Sequence[int], block_size: int) -> None:
    """Blocks ``source_ids`` of one pool into blocks ``target_ids`` of another, every layer, K and V.

    Pools are [layers, slots, kv_heads, head_dim]; each stretch of consecutive ids on both sides
    is one strided copy per tensor, straight from pool to pool.
    """
    num_blocks = source_k.shape[1] // block_size
    if source_ids and (min(source_ids) < 0 or max(source_ids) >= num_blocks):
        raise ValueError(f"a source block id is outside the pool's {num_blocks} blocks")
    views = [(_byte_blocks(source, block_size), _byte_blocks(target, block_size))
             for source, target in ((source_k, target_k), (source_v, target_v))]
    for source_start, target_start, length in _runs(source_ids, target_ids):
        for source, target in views:
            target[:, target_start : target_start + length].copy_(source[:, source_start : source_start + length])


def _byte_blocks(pool: torch.Tensor, block_size: int) -> torch.Tensor:
    """[layers, slots, kv_heads, head_dim] as [layers, blocks, bytes of a block] (bytes copy faster)."""
    return pool.view(torch.uint8).view(pool.shape[0], pool.shape[1] // block_size, -1)


class MappedPool:
    """A worker's own shared pool as one of its helper processes sees it.

    An exporter process reads blocks out of it (``read_kv``, the exporter's ``KvSource``); a pull
    helper writes received chunks into it (``write_blocks``), so mapped writable. The worker keeps
    the blocks pinned (lease, reservation) while a helper touches them.
    """

    def __init__(self, shm_dir: str, info: SharedPoolInfo, layout: KVLayout, *, writable: bool) -> None:
        per_tensor = _pool_bytes(layout, info.num_slots)
        if info.num_slots % layout.block_size or max(info.k_offset, info.v_offset) + per_tensor > info.segment_size:
            raise ValueError(f"shared pool {info.segment} does not hold {info.num_slots} slots of {layout}")
        if Path(info.segment).name != info.segment:
            raise ValueError(f"not a segment name: {info.segment!r}")
        self._layout = layout
        self._segment = Segment(Path(shm_dir) / info.segment, info.segment_size, create=False, populate=True,
                                writable=writable)
        self.k = _tensor(self._segment.view(info.k_offset, per_tensor), layout, info.num_slots)
        self.v = _tensor(self._segment.view(info.v_offset, per_tensor), layout, info.num_slots)
        self.num_blocks = info.num_slots // layout.block_size

    def kv_layout(self) -> KVLayout:
        return self._layout

    def _check(self, block_ids: Sequence[int]) -> None:
        if block_ids and (min(block_ids) < 0 or max(block_ids) >= self.num_blocks):
            raise ValueError(f"a block id is outside the pool's {self.num_blocks} blocks")

    def read_kv(self, block_ids: list[int], layer_start: int, layer_count: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``KvSource.read_kv`` over the mapping: [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        self._check(block_ids)
        return gather_blocks(self.k, self.v, self._layout.block_size, block_ids, layer_start, layer_count, out)

    def write_blocks(self, block_ids: list[int], layer_start: int, data: torch.Tensor) -> None:
        """The inverse of ``read_kv``: ``data`` into ``block_ids`` from ``layer_start`` on."""
        self._check(block_ids)
        scatter_blocks(self.k, self.v, self._layout.block_size, block_ids, layer_start, data)

    def close(self) -> None:
        del self.k, self.v
        self._segment.close()
