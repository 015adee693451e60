"""Pool-to-pool copies of the shm transport above the inline bound: the loop and the copy threads
each take a part, every block lands where the reservation says, and a failing part fails the pull
only after every other part has stopped writing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from tandem.engine.types import KVLayout
from tandem.kv.transfer.protocol import KvTransferError, TransferHandle
from tandem.kv.transfer.pull import ChannelPool
from tandem.kv.transfer.settings import PullSettings
from tandem.kv.transfer.shm import SegmentReader
from tandem.kv.transfer.shm_pull import _INLINE_BYTES, ShmKvPuller
from tandem.kv.transfer.synthetic import SyntheticKvPool

# 256 KiB a block (all layers, K and V): 64 blocks are 16 MiB, well over the inline bound.
LAYOUT = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, block_size=16, dtype="float32")
NUM_BLOCKS = 64


class RecordingSink:
    """Block i of the handle lands in ``targets[i]`` of ``pool``; notes which thread copied what."""

    def __init__(self, pool: SyntheticKvPool, targets: list[int], fails: Callable[[int], bool] = lambda _: False
                 ) -> None:
        self.pool = pool
        self.targets = targets
        self.fails = fails
        self.parts: list[tuple[int, int, str]] = []
        self.running = 0
        self.lock = threading.Lock()

    def copy_from_pool(self, block_index: int, source_k: torch.Tensor, source_v: torch.Tensor,
                       source_block_ids: Sequence[int]) -> None:
        with self.lock:
            self.running += 1
            self.parts.append((block_index, len(source_block_ids), threading.current_thread().name))
        try:
            if self.fails(block_index):
                raise RuntimeError("the reservation went away")
            time.sleep(0.01)  # long enough that a pull returning early would be caught below
            targets = self.targets[block_index : block_index + len(source_block_ids)]
            self.pool.copy_blocks_from(targets, source_k, source_v, source_block_ids)
        finally:
            with self.lock:
                self.running -= 1


def _handle(source: SyntheticKvPool, source_ids: list[int]) -> TransferHandle:
    assert source.shared is not None
    return TransferHandle(transfer_id="t", address="127.0.0.1:1", layout=LAYOUT, num_blocks=len(source_ids),
                          num_tokens=len(source_ids) * LAYOUT.block_size, lease_ms=60_000, host_id="h",
                          shared_pool=source.shared.info, block_ids=tuple(source_ids),
                          lease_deadline_s=time.monotonic() + 60)


@pytest.fixture
def source(tmp_path: Path) -> SyntheticKvPool:
    pool = SyntheticKvPool(LAYOUT, 2 * NUM_BLOCKS, shm_dir=str(tmp_path))
    pool.fill(list(range(2 * NUM_BLOCKS)), seed=3)
    yield pool
    pool.close()


async def test_a_large_copy_is_shared_by_the_loop_and_the_threads(source: SyntheticKvPool, tmp_path: Path) -> None:
    source_ids = list(range(2 * NUM_BLOCKS - 1, NUM_BLOCKS - 1, -1))  # scattered: no two neighbours adjacent
    dest = SyntheticKvPool(LAYOUT, 2 * NUM_BLOCKS)
    targets = list(range(3, 3 + NUM_BLOCKS))
    sink = RecordingSink(dest, targets)
    puller = ShmKvPuller(PullSettings(num_copy_threads=2), ChannelPool(1), SegmentReader(str(tmp_path)))
    try:
        result = await puller.pull(_handle(source, source_ids), 2, sink, timeout_s=10)
    finally:
        await puller.close()

    layers = LAYOUT.num_layers
    assert torch.equal(source.read_kv(source_ids[2:], 0, layers), dest.read_kv(targets[2:], 0, layers))
    assert not dest.read_kv(targets[:2], 0, layers).any()  # the blocks before first_block stay untouched
    assert result.num_bytes == (NUM_BLOCKS - 2) * LAYOUT.bytes_per_block_layer * layers
    # Parts cover [2, 64) once each; the loop's part is the first and stays within the inline bound.
    parts = sorted(sink.parts)
    assert [start for start, _, _ in parts] == [2, *(start for start, _, _ in parts[1:])]
    assert sum(count for _, count, _ in parts) == NUM_BLOCKS - 2
    assert all(a + n == b for (a, n, _), (b, _, _) in zip(parts, parts[1:], strict=False))
    assert parts[0][2] == threading.main_thread().name
    assert parts[0][1] * LAYOUT.bytes_per_block_layer * layers <= _INLINE_BYTES
    assert {name for _, _, name in parts[1:]} and all(name.startswith("kv-pull") for _, _, name in parts[1:])
    assert result.num_chunks == len(parts) == 3


async def test_a_failing_part_fails_the_pull_after_every_part_stopped(source: SyntheticKvPool, tmp_path: Path) -> None:
    dest = SyntheticKvPool(LAYOUT, 2 * NUM_BLOCKS)
    sink = RecordingSink(dest, list(range(NUM_BLOCKS)), fails=lambda start: start >= NUM_BLOCKS // 2)
    puller = ShmKvPuller(PullSettings(num_copy_threads=2), ChannelPool(1), SegmentReader(str(tmp_path)))
    try:
        with pytest.raises(KvTransferError, match="reservation went away") as caught:
            await puller.pull(_handle(source, list(range(NUM_BLOCKS))), 0, sink, timeout_s=10)
        assert caught.value.reason == "shm"
        assert sink.running == 0  # nothing still writing into blocks the caller may free next
    finally:
        await puller.close()


async def test_a_failing_loop_part_waits_for_the_threads(source: SyntheticKvPool, tmp_path: Path) -> None:
    dest = SyntheticKvPool(LAYOUT, 2 * NUM_BLOCKS)
    # Only the loop's part (the first) fails, at once; the threads' parts are still copying then.
    sink = RecordingSink(dest, list(range(NUM_BLOCKS)), fails=lambda start: start == 0)
    puller = ShmKvPuller(PullSettings(num_copy_threads=2), ChannelPool(1), SegmentReader(str(tmp_path)))
    try:
        with pytest.raises(KvTransferError, match="reservation went away"):
            await puller.pull(_handle(source, list(range(NUM_BLOCKS))), 0, sink, timeout_s=10)
        assert sink.running == 0
        assert len(sink.parts) == 3  # the threads' parts ran to the end before the error came out
    finally:
        await puller.close()


def test_a_helper_process_mapping_reads_and_writes_the_workers_pool(source: SyntheticKvPool, tmp_path: Path) -> None:
    from tandem.kv.transfer.shared_pool import MappedPool

    assert source.shared is not None
    reader = MappedPool(str(tmp_path), source.shared.info, LAYOUT, writable=False)
    writer = MappedPool(str(tmp_path), source.shared.info, LAYOUT, writable=True)
    try:
        blocks = [5, 1, 9]
        assert torch.equal(reader.read_kv(blocks, 2, 3), source.read_kv(blocks, 2, 3))
        data = torch.randn(3, 2, 2, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        writer.write_blocks([7, 3], 2, data)
        assert torch.equal(source.read_kv([7, 3], 2, 3), data)  # the worker sees the helper's write
        with pytest.raises(ValueError, match="outside the pool"):
            writer.write_blocks([2 * NUM_BLOCKS], 0, data[:, :, :1])
    finally:
        reader.close()
        writer.close()
