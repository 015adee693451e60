"""The shared-memory half of the decode worker's pull: pool to pool when the prefill worker's pool
is in shared memory, else staging segments named by PullKv (the streaming machinery of ``pull``)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import torch

from tandem.engine.types import KVLayout
from tandem.kv.transfer.protocol import KvSink, KvTransferError, PullResult, TransferHandle
from tandem.kv.transfer.pull import ChannelPool, ChunkHook, _StreamingPuller
from tandem.kv.transfer.settings import PullSettings
from tandem.kv.transfer.shared_pool import SharedPoolInfo, map_pool
from tandem.kv.transfer.shm import SegmentReader
from tandem.proto.kv.v1 import kv_pb2

# Pool-to-pool copies: up to this many bytes on the event loop (well under a millisecond; handing
# them to a thread costs about as much). Larger copies are cut into parts of at least _SPLIT_BYTES:
# the copy threads take all but the first, which the loop copies meanwhile (at most _INLINE_BYTES
# of it, so other streams' tokens wait no longer than that). Measured on a 16-core host against one
# memcpy of as many bytes: 3 MB on the loop 62-75%; 12 MB in three parts 90-98% (one thread: 51-107%);
# 25-377 MB 121-192%. 1 MiB bounds made the 3 MB copy worse (44%): the threads' hand-offs cost more.
_INLINE_BYTES = 4 * 1024 * 1024
_SPLIT_BYTES = 4 * 1024 * 1024


class ShmKvPuller(_StreamingPuller):
    """Same host. When the prefill worker's pool is in shared memory (the handle says so), copy the
    blocks pool to pool with no PullKv call; otherwise PullKv names staging segments to copy from."""

    name = "shm"
    transport = kv_pb2.KV_TRANSPORT_SHM

    def __init__(self, settings: PullSettings, channels: ChannelPool, reader: SegmentReader, *,
                 chunk_hook: ChunkHook | None = None) -> None:
        super().__init__(settings, channels, chunk_hook=chunk_hook)
        self._reader = reader
        # The last peer pool's K and V tensors (over the reader's cached mapping).
        self._pools: dict[tuple[SharedPoolInfo, KVLayout], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def _skip_checksum(self) -> bool:
        return not self.settings.verify_shm_checksums

    async def pull(self, handle: TransferHandle, first_block: int, sink: KvSink, *, timeout_s: float) -> PullResult:
        if handle.shared_pool is None or handle.lease_deadline_s is None or self.settings.verify_shm_checksums:
            return await super().pull(handle, first_block, sink, timeout_s=timeout_s)  # staged, checksummed
        return await self._copy_from_pool(handle, first_block, sink)

    async def _copy_from_pool(self, handle: TransferHandle, first_block: int, sink: KvSink) -> PullResult:
        """Blocks [first_block, num_blocks) straight from the peer's pool into ``sink``, within the lease."""
        assert handle.shared_pool is not None and handle.lease_deadline_s is not None  # checked by pull()
        started = time.perf_counter()
        if time.monotonic() >= handle.lease_deadline_s:
            raise KvTransferError("the lease may have ended before the copy began", "deadline")
        if len(handle.block_ids) != handle.num_blocks:
            raise KvTransferError(f"the handle lists {len(handle.block_ids)} blocks for {handle.num_blocks}", "shm")
        pool_key = (handle.shared_pool, handle.layout)
        try:
            if pool_key not in self._pools:
                self._pools = {pool_key: map_pool(self._reader, handle.shared_pool, handle.layout)}  # one peer at a time
            source_k, source_v = self._pools[pool_key]
        except (OSError, ValueError) as error:
            raise KvTransferError(f"cannot map the prefill worker's pool: {error}", "shm") from error
        block_ids = handle.block_ids[first_block:]
        bytes_per_block = handle.layout.bytes_per_block_layer * handle.layout.num_layers
        num_bytes = len(block_ids) * bytes_per_block
        if num_bytes <= _INLINE_BYTES:
            self._copy_inline(sink, first_block, source_k, source_v, block_ids)
            return self._pool_result(handle, num_bytes, 1, started)
        # The loop's share first, then the threads' parts, each at least _SPLIT_BYTES.
        num_threads = self.settings.num_copy_threads
        inline = min(max(1, _INLINE_BYTES // bytes_per_block), max(1, len(block_ids) // (num_threads + 1)))
        rest = len(block_ids) - inline
        num_parts = max(1, min(num_threads, rest * bytes_per_block // _SPLIT_BYTES, rest))
        bounds = [inline + rest * i // num_parts for i in range(num_parts + 1)]
        loop = asyncio.get_running_loop()
        copies = [loop.run_in_executor(self._executor, sink.copy_from_pool, first_block + start, source_k, source_v,
                                       block_ids[start:end]) for start, end in itertools.pairwise(bounds)]
        try:
            self._copy_inline(sink, first_block, source_k, source_v, block_ids[:inline])
            await asyncio.wait(copies)
        finally:
            # Never return (or raise) while a copy into the reservation is still running: the caller
            # may free the reserved blocks next. (asyncio.wait, unlike gather, leaves them running.)
            if not all(copy.done() for copy in copies):
                await asyncio.wait(copies)
        errors = [copy.exception() for copy in copies if copy.exception() is not None]
        if errors:
            raise KvTransferError(f"copying from the prefill worker's pool failed: {errors[0]!r}", "shm") from errors[0]
        return self._pool_result(handle, num_bytes, len(copies) + 1, started)

    @staticmethod
    def _copy_inline(sink: KvSink, first_block: int, source_k: torch.Tensor, source_v: torch.Tensor,
                     block_ids: Sequence[int]) -> None:
        try:
            sink.copy_from_pool(first_block, source_k, source_v, block_ids)
        except (OSError, ValueError, RuntimeError) as error:
            raise KvTransferError(f"copying from the prefill worker's pool failed: {error!r}", "shm") from error

    def _pool_result(self, handle: TransferHandle, num_bytes: int, num_parts: int, started: float) -> PullResult:
        assert handle.lease_deadline_s is not None
        if time.monotonic() >= handle.lease_deadline_s:  # the blocks may have been reused while we copied
            raise KvTransferError("the lease may have ended during the copy", "deadline")
        return PullResult(self.name, num_bytes=num_bytes, num_chunks=num_parts, duration_s=time.perf_counter() - started)

    def _payload(self, header: kv_pb2.KvChunk, data: memoryview) -> memoryview:
        if not header.HasField("shm"):
            raise ValueError("an shm chunk without a segment")
        shm = header.shm
        return self._reader.view(shm.segment, shm.segment_size, shm.offset, shm.length)

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._pools.clear()
        self._reader.close()
        await self._channels.close()
