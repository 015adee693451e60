"""Block pool: reference counts, prefix reuse by hash, LRU eviction, and a leak check."""

from __future__ import annotations

import pytest

from tandem.engine.hf.block_manager import BlockManager
from tandem.kv.hashing import hash_blocks

pytestmark = pytest.mark.unit

BS = 4


def assert_no_leak(bm: BlockManager) -> None:
    assert bm.num_used_blocks == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_allocate_and_free_returns_every_block() -> None:
    bm = BlockManager(8, BS)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert bm.num_free_blocks == 0 and len(set(a + b)) == 8
    assert not bm.can_allocate(1)
    with pytest.raises(RuntimeError):
        bm.allocate(1)
    bm.free(a)
    bm.free(b)
    assert_no_leak(bm)


def test_double_free_is_an_error() -> None:
    bm = BlockManager(2, BS)
    blocks = bm.allocate(1)
    bm.free(blocks)
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(blocks)


def test_registered_blocks_are_found_again_after_free() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(10))  # two full blocks and a partial one
    table = bm.allocate(3)
    hashes: list[int] = []
    bm.register(table, tokens, hashes)
    assert hashes == hash_blocks(tokens, BS)
    bm.free(table)
    assert_no_leak(bm)
    hits = bm.find_prefix(hash_blocks(tokens[:8] + [99, 98, 97, 96], BS))
    assert hits == table[:2]  # the diverging third block is not a hit
    bm.take(hits)
    assert bm.num_used_blocks == 2
    bm.free(hits)
    assert_no_leak(bm)


def test_shared_prefix_is_refcounted() -> None:
    bm = BlockManager(8, BS)
    tokens = list(range(8))
    table = bm.allocate(2)
    bm.register(table, tokens, [])
    hits = bm.find_prefix(hash_blocks(tokens, BS))
    bm.take(hits)
    assert [bm.blocks[i].ref_count for i in table] == [2, 2]
    bm.free(table)
    assert bm.num_used_blocks == 2  # still held by the second sequence
    bm.free(hits)
    assert_no_leak(bm)


def test_eviction_is_lru_and_reported() -> None:
    events: list[tuple[str, list[int]]] = []
    bm = BlockManager(4, BS, on_event=lambda kind, hashes: events.append((kind, hashes)))
    old, new = bm.allocate(2), bm.allocate(2)
    bm.register(old, list(range(8)), [])
    bm.register(new, list(range(100, 108)), [])
    bm.free(old)  # freed first: evicted first
    bm.free(new)
    bm.allocate(2)
    assert bm.find_prefix(hash_blocks(list(range(8)), BS)) == []
    assert bm.find_prefix(hash_blocks(list(range(100, 108)), BS)) == new
    assert events[0][0] == "stored" and events[-1][0] == "removed"
    assert events[-1][1] == hash_blocks(list(range(8)), BS)[::-1]


def test_can_allocate_counts_revived_cached_blocks() -> None:
    bm = BlockManager(3, BS)
    table = bm.allocate(2)
    bm.register(table, list(range(8)), [])
    bm.free(table)
    # 3 free blocks, but reviving the 2 cached ones leaves only 1 for new data
    assert bm.can_allocate(1, table)
    assert not bm.can_allocate(2, table)


def test_reset_prefix_cache_only_when_idle() -> None:
    bm = BlockManager(4, BS)
    table = bm.allocate(1)
    bm.register(table, list(range(4)), [])
    assert not bm.reset_prefix_cache()
    bm.free(table)
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
