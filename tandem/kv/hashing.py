"""Chained block hashes: the name of a full KV block, identical on every worker and in the router.

A block's hash covers its own tokens and, through the parent hash, every token before it, so
equal hashes mean equal prefixes. blake2b keeps it stable across processes and Python versions
(the built-in ``hash`` is salted per process for bytes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0  # parent of a sequence's first block


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """64-bit hash of one full block given its parent's hash."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent_hash.to_bytes(8, "little"))
    digest.update(array("I", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def hash_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of ``token_ids``; a trailing partial block has none."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size])
        hashes.append(parent_hash)
    return hashes
