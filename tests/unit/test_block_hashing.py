"""Chained block hashes: the router and every worker must name the same prefix with the same hash."""

from __future__ import annotations

import itertools
import random

import pytest

from tandem.engine.hf.block_manager import BlockManager
from tandem.kv.hashing import ROOT_HASH, hash_block, hash_blocks, iter_block_hashes

pytestmark = pytest.mark.unit


def _reference(token_ids: list[int], block_size: int) -> list[int]:
    """The definition: each full block hashed with its parent, one block at a time."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) // block_size * block_size, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "num_hashes"),
    [(0, 16, 0), (15, 16, 0), (16, 16, 1), (17, 16, 1), (100, 16, 6), (8000, 16, 500), (7, 1, 7), (64, 32, 2)],
)
def test_hash_blocks_matches_the_definition(num_tokens: int, block_size: int, num_hashes: int) -> None:
    token_ids = [random.Random(num_tokens).randrange(49152) for _ in range(num_tokens)]
    hashes = hash_blocks(token_ids, block_size)
    assert len(hashes) == num_hashes  # a trailing partial block has no hash
    assert hashes == _reference(token_ids, block_size)


def test_hashes_are_stable_across_processes_and_versions() -> None:
    # Pinned values: a router and workers of different releases must still agree.
    assert hash_blocks(list(range(32)), 16) == [10251598853290956434, 14413796365232270483]
    assert hash_blocks([1, 2, 3, 4], 2) == [18389742664249816232, 11220972698411055348]


def test_a_change_in_one_block_changes_it_and_every_later_block_only() -> None:
    base = list(range(64))
    changed = base.copy()
    changed[20] = 999  # inside block 1 of 16-token blocks
    a, b = hash_blocks(base, 16), hash_blocks(changed, 16)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_equal_blocks_at_different_positions_hash_differently() -> None:
    hashes = hash_blocks([7] * 48, 16)
    assert len(set(hashes)) == 3  # the chain, not the block's own tokens, names it


def test_continuing_from_a_parent_hash_equals_hashing_the_whole() -> None:
    tokens = list(range(96))
    head = hash_blocks(tokens[:32], 16)
    assert head + hash_blocks(tokens[32:], 16, parent_hash=head[-1]) == hash_blocks(tokens, 16)


def test_the_lazy_iterator_yields_the_same_prefix() -> None:
    tokens = list(range(160))
    assert list(itertools.islice(iter_block_hashes(tokens, 16), 3)) == hash_blocks(tokens, 16)[:3]


def test_the_engine_publishes_the_hashes_the_router_computes() -> None:
    events: list[tuple[str, list[int]]] = []
    manager = BlockManager(num_blocks=8, block_size=4, on_event=lambda kind, hashes: events.append((kind, hashes)))
    tokens = list(range(100, 114))  # 3 full blocks and 2 tokens
    block_ids = manager.allocate(4)
    block_hashes: list[int] = []
    manager.register(block_ids, tokens, block_hashes)
    assert events == [("stored", hash_blocks(tokens, 4))]


def test_a_protobuf_repeated_field_hashes_like_a_list() -> None:
    from tandem.proto.router.v1 import router_pb2

    tokens = list(range(3, 3 + 40 * 16 + 5))  # more than one conversion chunk
    assert hash_blocks(router_pb2.RouteRequest(token_ids=tokens).token_ids, 16) == hash_blocks(tokens, 16)
