"""The KV block pool: reference counts, prefix reuse by chained hash, LRU eviction of unused blocks.

Free blocks sit in an LRU queue; a freed block keeps its hash, so a later request with the
same prefix can take it back (a prefix-cache hit) until allocation evicts it from the front.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandem.kv.hashing import ROOT_HASH, hash_block


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered


class BlockManager:
    """Owns every block of one KV pool. Not thread-safe: only the engine's step thread calls it."""

    def __init__(self, num_blocks: int, block_size: int,
                 on_event: Callable[[str, list[int]], object] | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        # ("stored" | "removed", hashes): the feed for KV events to the router
        self._on_event = on_event

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix of ``block_hashes`` (no references taken)."""
        hits: list[int] = []
        for block_hash in block_hashes:
            block_id = self._by_hash.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, num_new_blocks: int, reused: Sequence[int] = ()) -> bool:
        """Whether ``num_new_blocks`` fresh blocks fit after reviving the ``reused`` cached ones."""
        revived = sum(1 for b in reused if self.blocks[b].ref_count == 0)
        return self.num_free_blocks - revived >= num_new_blocks

    # -- changes ---------------------------------------------------------------------------

    def take(self, block_ids: Sequence[int]) -> None:
        """Reference cached blocks (prefix hits) for one more sequence."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks with one reference each, evicting the least recently freed first."""
        if num_blocks > len(self._free):
            raise RuntimeError(f"allocate({num_blocks}) with {len(self._free)} free blocks")
        allocated: list[int] = []
        evicted: list[int] = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._by_hash.get(block.block_hash) == block_id:
                    del self._by_hash[block.block_hash]
                    evicted.append(block.block_hash)
                block.block_hash = None
            block.ref_count = 1
            allocated.append(block_id)
        if evicted and self._on_event:
            self._on_event("removed", evicted)
        return allocated

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; unreferenced ones become evictable.

        Freed in reverse so a sequence's tail is evicted before its head, which more
        requests are likely to share.
        """
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def register(self, block_ids: Sequence[int], computed_token_ids: Sequence[int],
                 block_hashes: list[int]) -> None:
        """Name a sequence's newly full blocks by chained hash, so other requests can reuse them.

        ``computed_token_ids`` are the tokens whose KV is written; ``block_hashes`` holds the
        hashes of the sequence's blocks named so far and is extended in place.
        """
        stored: list[int] = []
        parent = block_hashes[-1] if block_hashes else ROOT_HASH
        bs = self.block_size
        token_ids = computed_token_ids
        for index in range(len(block_hashes), len(token_ids) // bs):
            if index >= len(block_ids):
                break
            parent = hash_block(parent, token_ids[index * bs : (index + 1) * bs])
            block_hashes.append(parent)
            block = self.blocks[block_ids[index]]
            if block.block_hash is None and parent not in self._by_hash:
                block.block_hash = parent
                self._by_hash[parent] = block.block_id
                stored.append(parent)
        if stored and self._on_event:
            self._on_event("stored", stored)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._by_hash.clear()
        if self._on_event:
            self._on_event("cleared", [])
        return True
