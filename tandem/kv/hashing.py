"""Chained block hashes: the name of a full KV block, identical on every worker and in the router.

A block's hash covers its own tokens and, through the parent hash, every token before it, so
equal hashes mean equal prefixes. blake2b keeps it stable across processes and Python versions
(the built-in ``hash`` is salted per process for bytes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence

ROOT_HASH = 0  # parent of a sequence's first block
_CHUNK_BLOCKS = 32  # blocks converted to bytes at a time by iter_block_hashes


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent_hash.to_bytes(8, "little"))
    digest.update(array("I", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def iter_block_hashes(token_ids: Sequence[int], block_size: int,
                      parent_hash: int = ROOT_HASH) -> Iterator[int]:
    """Lazily, the hashes of every full block of ``token_ids`` (equal to chaining ``hash_block``).

    Lazy so the router can stop hashing a long prompt at the first block no worker holds; the
    tokens are converted to bytes a chunk at a time for the same reason (converting a protobuf
    repeated field of 8,000 tokens alone takes ~0.3 ms). Chaining the 8-byte digests directly
    makes it ~1.6x faster than per-block ``hash_block`` on the router's decision path.
    """
    end = len(token_ids) // block_size * block_size
    chunk_tokens = _CHUNK_BLOCKS * block_size
    step = block_size * 4
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    parent = parent_hash.to_bytes(8, "little")  # a digest is the little-endian bytes of the hash
    for chunk_start in range(0, end, chunk_tokens):
        data = array("I", token_ids[chunk_start : min(chunk_start + chunk_tokens, end)]).tobytes()
        for start in range(0, len(data), step):
            parent = blake2b(parent + data[start : start + step], digest_size=8).digest()
            yield from_bytes(parent, "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of ``token_ids``; a trailing partial block has none."""
    return list(iter_block_hashes(token_ids, block_size, parent_hash))
