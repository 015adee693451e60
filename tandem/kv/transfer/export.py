"""The prefill worker's half of each transport: pinned blocks -> encoded KvChunk messages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from tandem.kv.transfer.chunks import ChunkSpec, checksum, chunk_shape, tensor_bytes, tensor_from_bytes
from tandem.kv.transfer.protocol import KvSource
from tandem.kv.transfer.shm import SegmentPool
from tandem.kv.transfer.wire import encode_chunk
from tandem.proto.kv.v1 import kv_pb2


def _header(chunk: ChunkSpec) -> kv_pb2.KvChunk:
    return kv_pb2.KvChunk(sequence_number=chunk.sequence_number, layer_start=chunk.layer_start,
                          num_layers=chunk.num_layers, block_start=chunk.block_start, num_blocks=chunk.num_blocks)


def _read(source: KvSource, block_ids: Sequence[int], chunk: ChunkSpec):  # type: ignore[no-untyped-def]
    blocks = list(block_ids[chunk.block_start : chunk.block_start + chunk.num_blocks])
    return source.read_kv(blocks, chunk.layer_start, chunk.num_layers)


class GrpcChunkExporter:
    """Chunk bytes inside the gRPC messages. Holds nothing between calls."""

    name = "grpc"

    async def chunks(self, transfer_id: str, source: KvSource, block_ids: Sequence[int], plan: Sequence[ChunkSpec],
                     *, skip_checksum: bool) -> AsyncIterator[bytes]:
        for chunk in plan:
            payload = tensor_bytes(_read(source, block_ids, chunk))
            header = _header(chunk)
            header.checksum = checksum(payload)  # always: these bytes cross a network
            yield encode_chunk(header, payload)

    def release(self, transfer_id: str) -> None:
        pass

    def close(self) -> None:
        pass


class ShmChunkExporter:
    """Chunk bytes written into a shared-memory segment kept for the transfer; messages carry offsets.

    Each chunk is announced as soon as it is written, so the decode worker copies chunk i while
    this side writes chunk i + 1: the two copies overlap on two cores.
    """

    name = "shm"

    def __init__(self, shm_dir: str, max_free_bytes: int) -> None:
        self.pool = SegmentPool(shm_dir, max_free_bytes)

    async def chunks(self, transfer_id: str, source: KvSource, block_ids: Sequence[int], plan: Sequence[ChunkSpec],
                     *, skip_checksum: bool) -> AsyncIterator[bytes]:
        if not plan:
            return
        layout = source.kv_layout()
        size = max(chunk.offset + chunk.num_bytes for chunk in plan)
        segment = self.pool.acquire(transfer_id, size)
        for chunk in plan:
            view = segment.view(chunk.offset, chunk.num_bytes)
            tensor_from_bytes(view, layout, chunk).copy_(_read(source, block_ids, chunk).view(chunk_shape(layout, chunk)))
            header = _header(chunk)
            if not skip_checksum:
                header.checksum = checksum(view)
            header.shm.CopyFrom(kv_pb2.ShmSlice(segment=segment.name, offset=chunk.offset, length=chunk.num_bytes,
                                                segment_size=segment.size))
            yield encode_chunk(header, None)

    def release(self, transfer_id: str) -> None:
        self.pool.release(transfer_id)

    def close(self) -> None:
        self.pool.close()
