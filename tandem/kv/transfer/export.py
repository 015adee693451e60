"""The prefill worker's half of each transport: pinned blocks -> encoded KvChunk messages.

Chunks are prepared (gathered, checksummed, encoded) on a small thread pool a few chunks ahead of
the one being sent: the copies and CRC-32C release the GIL, so they overlap with gRPC's sending and
with each other on machines with cores to spare. (With the pool itself in shared memory a same-host
decode worker copies blocks without any PullKv call: see ``shared_pool``.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from tandem.kv.transfer.chunks import ChunkSpec, checksum, tensor_from_bytes
from tandem.kv.transfer.protocol import KvSource
from tandem.kv.transfer.shm import Segment, SegmentPool
from tandem.kv.transfer.wire import ChunkMessage, encode_chunk
from tandem.proto.kv.v1 import kv_pb2

DEFAULT_THREADS = 2


def _header(chunk: ChunkSpec) -> kv_pb2.KvChunk:
    return kv_pb2.KvChunk(sequence_number=chunk.sequence_number, layer_start=chunk.layer_start,
                          num_layers=chunk.num_layers, block_start=chunk.block_start, num_blocks=chunk.num_blocks)


def _read(source: KvSource, block_ids: Sequence[int], chunk: ChunkSpec, out: torch.Tensor | None = None
          ) -> torch.Tensor:
    blocks = list(block_ids[chunk.block_start : chunk.block_start + chunk.num_blocks])
    return source.read_kv(blocks, chunk.layer_start, chunk.num_layers, out)


class _ThreadedExporter:
    """Runs ``prepare(chunk)`` for the plan on worker threads, ``lookahead`` chunks ahead, yielding in order."""

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None

    async def _in_order(self, plan: Sequence[ChunkSpec], prepare: Callable[[ChunkSpec], bytes]
                        ) -> AsyncGenerator[bytes, None]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="kv-export")
        loop = asyncio.get_running_loop()
        pending: deque[asyncio.Future[bytes]] = deque()
        upcoming = iter(plan)
        try:
            for chunk in upcoming:
                pending.append(loop.run_in_executor(self._executor, prepare, chunk))
                if len(pending) > self._threads:
                    break
            while pending:
                message = await pending.popleft()
                following = next(upcoming, None)
                if following is not None:
                    pending.append(loop.run_in_executor(self._executor, prepare, following))
                yield message
        finally:
            for future in pending:  # the caller went away: let the started copies finish, unread
                future.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class GrpcChunkExporter(_ThreadedExporter):
    """Chunk bytes inside the gRPC messages, gathered straight into them. Holds nothing between calls."""

    name = "grpc"

    def chunks(self, transfer_id: str, source: KvSource, block_ids: Sequence[int], plan: Sequence[ChunkSpec],
               *, skip_checksum: bool) -> AsyncIterator[bytes]:
        layout = source.kv_layout()

        def prepare(chunk: ChunkSpec) -> bytes:
            message = ChunkMessage(_header(chunk), chunk.num_bytes)
            _read(source, block_ids, chunk, out=tensor_from_bytes(message.payload, layout, chunk))
            return message.finish(checksum(message.payload))  # always: these bytes cross a network

        return self._in_order(plan, prepare)

    def release(self, transfer_id: str) -> None:
        pass

    def close(self) -> None:
        self._shutdown()


class ShmChunkExporter(_ThreadedExporter):
    """Chunk bytes written into a shared-memory segment kept for the transfer; messages carry offsets.

    Each chunk is announced as soon as it is written, so the decode worker copies chunk i out
    while this side writes the next ones in: the two sides' copies overlap.
    """

    name = "shm"

    def __init__(self, shm_dir: str, max_free_bytes: int, threads: int = DEFAULT_THREADS) -> None:
        super().__init__(threads)
        self.pool = SegmentPool(shm_dir, max_free_bytes)
        # A segment goes back to the pool only once no pull writes into it any more.
        self._num_pulls: dict[str, int] = {}
        self._released: set[str] = set()

    async def chunks(self, transfer_id: str, source: KvSource, block_ids: Sequence[int], plan: Sequence[ChunkSpec],
                     *, skip_checksum: bool) -> AsyncIterator[bytes]:
        if not plan:
            return
        layout = source.kv_layout()
        segment: Segment = self.pool.acquire(transfer_id, max(c.offset + c.num_bytes for c in plan))

        def prepare(chunk: ChunkSpec) -> bytes:
            view = segment.view(chunk.offset, chunk.num_bytes)
            _read(source, block_ids, chunk, out=tensor_from_bytes(view, layout, chunk))  # straight into the segment
            header = _header(chunk)
            if not skip_checksum:
                header.crc32c = checksum(view)
            header.shm.CopyFrom(kv_pb2.ShmSlice(segment=segment.name, offset=chunk.offset, length=chunk.num_bytes,
                                                segment_size=segment.size))
            return encode_chunk(header, None)

        self._num_pulls[transfer_id] = self._num_pulls.get(transfer_id, 0) + 1
        messages = self._in_order(plan, prepare)
        try:
            async for message in messages:
                yield message
        finally:
            await messages.aclose()  # waits for copies still running on the threads
            self._num_pulls[transfer_id] -= 1
            if not self._num_pulls[transfer_id]:
                del self._num_pulls[transfer_id]
                if transfer_id in self._released:
                    self._released.discard(transfer_id)
                    self.pool.release(transfer_id)

    def release(self, transfer_id: str) -> None:
        if transfer_id in self._num_pulls:
            self._released.add(transfer_id)  # returned when the last pull ends
        else:
            self.pool.release(transfer_id)

    def close(self) -> None:
        self._shutdown()
        self.pool.close()
