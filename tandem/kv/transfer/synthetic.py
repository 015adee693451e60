"""A paged KV pool without a model: the transport benchmarks and tests move real bytes through it.

Laid out like the hf engine's pool (per layer, one K and one V tensor of [slots, kv_heads,
head_dim]) and copied with the same functions, so gathering and scattering costs what it costs there. ``prefill`` pins
blocks filled with a deterministic pattern instead of running a model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from tandem.engine.types import EngineRequest, EngineStats, KVLayout, PrefillResult
from tandem.errors import ResourceExhausted
from tandem.kv.block_copy import gather_blocks, scatter_blocks
from tandem.kv.transfer.chunks import TORCH_DTYPES
from tandem.kv.transfer.shared_pool import SharedKvPool, copy_blocks


class SyntheticKvPool:
    """Blocks of ``layout`` in host memory (in a shared-memory file under ``shm_dir`` when given, as
    a prefill worker's); ``read_kv``/``write_kv`` match the engines' shapes."""

    def __init__(self, layout: KVLayout, num_blocks: int, shm_dir: str | None = None) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        slots = num_blocks * layout.block_size
        shape = (layout.num_layers, slots, layout.num_kv_heads, layout.head_dim)
        dtype = TORCH_DTYPES[layout.dtype]
        self.shared = SharedKvPool(shm_dir, layout, slots) if shm_dir is not None else None
        if self.shared is not None:
            self.k_cache, self.v_cache = self.shared.k, self.shared.v
        else:
            self.k_cache = torch.zeros(shape, dtype=dtype)
            self.v_cache = torch.zeros(shape, dtype=dtype)

    def kv_layout(self) -> KVLayout:
        return self.layout

    def read_kv(self, block_ids: list[int], layer_start: int, layer_count: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        return gather_blocks(self.k_cache, self.v_cache, self.layout.block_size, block_ids, layer_start,
                             layer_count, out)

    def write_blocks(self, block_ids: list[int], layer_start: int, data: torch.Tensor) -> None:
        scatter_blocks(self.k_cache, self.v_cache, self.layout.block_size, block_ids, layer_start, data)

    def copy_blocks_from(self, block_ids: Sequence[int], source_k: torch.Tensor, source_v: torch.Tensor,
                         source_block_ids: Sequence[int]) -> None:
        """Blocks of another pool ([layers, slots, kvh, d]) into ``block_ids`` of this one."""
        copy_blocks(source_k, source_v, source_block_ids, self.k_cache, self.v_cache, block_ids,
                    self.layout.block_size)

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()

    def touch(self, block_ids: list[int]) -> None:
        """Read and write every slot of ``block_ids`` in place (times one: the values stay as they are)."""
        size = self.layout.block_size
        for cache in (self.k_cache, self.v_cache):
            blocks = cache.view(cache.shape[0], cache.shape[1] // size, -1)
            for block in block_ids:
                blocks[:, block].mul_(1)

    def fill(self, block_ids: list[int], seed: int) -> None:
        """Distinct, reproducible values in every slot of ``block_ids``."""
        generator = torch.Generator().manual_seed(seed)
        for layer in range(self.layout.num_layers):
            data = torch.randn((1, 2, len(block_ids), self.layout.block_size, self.layout.num_kv_heads,
                                self.layout.head_dim), generator=generator).to(self.k_cache.dtype)
            self.write_blocks(block_ids, layer, data)


class SyntheticPrefillEngine(SyntheticKvPool):
    """The prefill role over a synthetic pool: "prefilling" pins blocks filled from the prompt length."""

    model_name = "synthetic"
    max_model_len = 1 << 20

    def __init__(self, layout: KVLayout, num_blocks: int, *, refill: bool = True, touch: bool = False,
                 shm_dir: str | None = None) -> None:
        """``refill=False`` leaves blocks as they are on prefill (benchmarks fill the pool once);
        ``touch`` then still writes each pinned block once, cheaply, as a real prefill writes its KV
        just before the transfer (so a transfer reads blocks as warm in the caches as a real one)."""
        super().__init__(layout, num_blocks, shm_dir)
        self._refill = refill
        self._touch = touch
        self._free = list(range(num_blocks))
        self.pinned: dict[str, list[int]] = {}
        self._seeds = itertools.count(1)

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    def healthy(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        used = self.num_blocks - len(self._free)
        return EngineStats(num_kv_blocks_used=used, num_kv_blocks_total=self.num_blocks, num_free_queue_slots=64,
                           block_size=self.layout.block_size, max_model_len=self.max_model_len)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        num_blocks = -(-len(request.prompt_token_ids) // self.layout.block_size)
        if num_blocks > len(self._free):
            raise ResourceExhausted("the synthetic pool is full")
        blocks, self._free = self._free[:num_blocks], self._free[num_blocks:]
        if self._refill:
            self.fill(blocks, next(self._seeds))
        elif self._touch:
            self.touch(blocks)
        self.pinned[request.request_id] = blocks
        return PrefillResult(request.request_id, first_token_id=1, finish_reason=None,
                             num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=0, block_ids=blocks)

    async def release_kv(self, request_id: str) -> None:
        self._free.extend(self.pinned.pop(request_id, []))

    async def abort(self, request_id: str) -> None:
        await self.release_kv(request_id)
