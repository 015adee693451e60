"""KV transfer over real gRPC (port 0): the PrefillService over a synthetic pool, pulled by both transports."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
import torch
from prometheus_client import CollectorRegistry

from services.prefill.servicer import SERVICE_NAME, PrefillServicer
from tandem.engine.types import KVLayout
from tandem.grpc_server import GrpcService
from tandem.kv.transfer.export import GrpcChunkExporter, ShmChunkExporter
from tandem.kv.transfer.host import host_id
from tandem.kv.transfer.metrics import ExportMetrics
from tandem.kv.transfer.protocol import KvTransferError, TransferHandle
from tandem.kv.transfer.pull import ChannelPool, GrpcKvPuller
from tandem.kv.transfer.settings import PullSettings
from tandem.kv.transfer.shm import SegmentReader
from tandem.kv.transfer.shm_pull import ShmKvPuller
from tandem.kv.transfer.synthetic import SyntheticKvPool, SyntheticPrefillEngine
from tandem.kv.transfer.wire import handle_from_proto
from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# 16 KiB per block of all layers: a 64 KiB chunk bound gives 4 blocks per chunk.
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32")
CHUNK_BYTES = 64 * 1024
NUM_TOKENS = 40 * 16 - 5  # 40 blocks, the last one partly filled: 10 chunks


@dataclass
class PrefillSide:
    engine: SyntheticPrefillEngine
    servicer: PrefillServicer
    metrics: ExportMetrics
    address: str
    stub: kv_pb2_grpc.PrefillServiceStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def prefill_side(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrefillSide]:
    shm_dir = str(tmp_path_factory.mktemp("shm"))
    engine = SyntheticPrefillEngine(LAYOUT, num_blocks=128, shm_dir=shm_dir)  # a pool in shared memory
    metrics = ExportMetrics(CollectorRegistry())
    service = GrpcService("127.0.0.1", 0, [SERVICE_NAME])
    address = f"127.0.0.1:{service.port}"
    exporters = {kv_pb2.KV_TRANSPORT_GRPC: GrpcChunkExporter(),
                 kv_pb2.KV_TRANSPORT_SHM: ShmChunkExporter(shm_dir, 64 * 1024 * 1024)}
    servicer = PrefillServicer(engine, exporters, metrics, lease_s=30, address=address, host_id=host_id(shm_dir))
    assert engine.shared is not None
    servicer.shared_pool = engine.shared.info
    servicer.add_to_server(service.server)
    await service.start()
    await service.set_serving(True)
    async with grpc.aio.insecure_channel(address) as channel:
        yield PrefillSide(engine, servicer, metrics, address, kv_pb2_grpc.PrefillServiceStub(channel))
    await servicer.leases.release_all()
    await service.stop(0)
    for exporter in exporters.values():
        exporter.close()
    engine.close()


@pytest.fixture(autouse=True)
def pools_back_to_zero(prefill_side: PrefillSide):  # type: ignore[no-untyped-def]
    yield
    assert len(prefill_side.servicer.leases) == 0
    assert prefill_side.engine.stats().num_kv_blocks_used == 0


class PoolSink:
    """A decode side's reservation: handle block i lands in ``block_ids[i]`` of ``pool``."""

    def __init__(self, pool: SyntheticKvPool, block_ids: list[int]) -> None:
        self.pool = pool
        self.block_ids = block_ids

    def write(self, block_index: int, layer_start: int, data: torch.Tensor) -> None:
        self.pool.write_blocks(self.block_ids[block_index : block_index + data.shape[2]], layer_start, data)

    def copy_from_pool(self, block_index: int, source_k: torch.Tensor, source_v: torch.Tensor,
                       source_block_ids: Sequence[int]) -> None:
        targets = self.block_ids[block_index : block_index + len(source_block_ids)]
        self.pool.copy_blocks_from(targets, source_k, source_v, source_block_ids)


async def prefill(side: PrefillSide, num_tokens: int = NUM_TOKENS, *, with_lease_deadline: bool = False
                  ) -> tuple[TransferHandle, list[int]]:
    """Without ``with_lease_deadline`` the handle cannot prove its lease, so shm goes through staging."""
    sent_at = time.monotonic()
    response = await side.stub.Prefill(kv_pb2.PrefillRequest(request_id="r", prompt_token_ids=[1] * num_tokens))
    deadline = sent_at + response.handle.lease_ms / 1000 if with_lease_deadline else None
    return handle_from_proto(response.handle, side.address, deadline), side.engine.pinned[response.handle.transfer_id]


async def release(side: PrefillSide, handle: TransferHandle) -> bool:
    reply = await side.stub.ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=handle.transfer_id))
    return reply.released


def grpc_puller(streams: int = 2, **hooks) -> GrpcKvPuller:  # type: ignore[no-untyped-def]
    return GrpcKvPuller(PullSettings(max_chunk_bytes=CHUNK_BYTES, num_streams=streams, max_retries=2,
                                     retry_backoff_s=0.01), ChannelPool(streams), **hooks)


def shm_puller(shm_dir: str, verify: bool, **hooks) -> ShmKvPuller:  # type: ignore[no-untyped-def]
    settings = PullSettings(max_chunk_bytes=CHUNK_BYTES, num_streams=1, verify_shm_checksums=verify)
    return ShmKvPuller(settings, ChannelPool(1), SegmentReader(shm_dir), **hooks)


def assert_same_blocks(source: SyntheticKvPool, source_ids: list[int], dest: SyntheticKvPool, dest_ids: list[int],
                       first_block: int = 0) -> None:
    layers = LAYOUT.num_layers
    assert torch.equal(source.read_kv(source_ids[first_block:], 0, layers), dest.read_kv(dest_ids[first_block:], 0, layers))


async def test_grpc_pull_over_parallel_streams_copies_every_block(prefill_side: PrefillSide) -> None:
    handle, source_ids = await prefill(prefill_side)
    assert handle.num_blocks == 40 and handle.num_tokens == NUM_TOKENS and handle.layout == LAYOUT
    dest = SyntheticKvPool(LAYOUT, 64)
    dest_ids = list(range(63, 23, -1))  # a different, scattered set of blocks
    puller = grpc_puller(streams=3)
    try:
        result = await puller.pull(handle, 0, PoolSink(dest, dest_ids), timeout_s=10)
    finally:
        await puller.close()
    assert result.num_chunks == 10 and result.num_retried_chunks == 0
    assert result.num_bytes == 40 * LAYOUT.bytes_per_block_layer * LAYOUT.num_layers
    assert_same_blocks(prefill_side.engine, source_ids, dest, dest_ids)
    assert await release(prefill_side, handle) is True
    assert await release(prefill_side, handle) is False  # idempotent


@pytest.mark.parametrize("verify", [False, True])
async def test_shm_pull_copies_every_block(prefill_side: PrefillSide, tmp_path_factory: pytest.TempPathFactory,
                                           verify: bool) -> None:
    handle, source_ids = await prefill(prefill_side)
    exporter = prefill_side.servicer.exporters[kv_pb2.KV_TRANSPORT_SHM]
    assert isinstance(exporter, ShmChunkExporter)
    dest = SyntheticKvPool(LAYOUT, 40)
    dest_ids = list(range(40))
    puller = shm_puller(str(exporter.pool.shm_dir), verify)
    try:
        result = await puller.pull(handle, 0, PoolSink(dest, dest_ids), timeout_s=10)
    finally:
        await puller.close()
    assert result.transport == "shm" and result.num_chunks == 10
    assert_same_blocks(prefill_side.engine, source_ids, dest, dest_ids)
    assert exporter.pool.num_bytes > 0  # the segment waits for reuse once released
    await release(prefill_side, handle)


async def test_shm_copies_blocks_straight_from_the_prefill_pool_without_pull_kv(
        prefill_side: PrefillSide) -> None:
    handle, source_ids = await prefill(prefill_side, with_lease_deadline=True)
    assert handle.shared_pool is not None and list(handle.block_ids) == source_ids
    chunks_sent = prefill_side.metrics.chunks_sent.labels(transport="shm")._value.get()
    dest = SyntheticKvPool(LAYOUT, 64)
    dest_ids = list(range(63, 23, -1))  # scattered: no two neighbours adjacent
    puller = shm_puller(str(prefill_side.engine.shared.path.parent), verify=False)  # type: ignore[union-attr]
    try:
        result = await puller.pull(handle, 5, PoolSink(dest, dest_ids), timeout_s=10)
    finally:
        await puller.close()
    assert result.transport == "shm" and result.num_bytes == 35 * LAYOUT.bytes_per_block_layer * LAYOUT.num_layers
    assert_same_blocks(prefill_side.engine, source_ids, dest, dest_ids, first_block=5)
    assert not dest.read_kv(dest_ids[:5], 0, LAYOUT.num_layers).any()
    assert prefill_side.metrics.chunks_sent.labels(transport="shm")._value.get() == chunks_sent  # no PullKv
    assert await release(prefill_side, handle) is True


async def test_a_pool_copy_that_cannot_prove_its_lease_is_refused(prefill_side: PrefillSide) -> None:
    handle, _ = await prefill(prefill_side, with_lease_deadline=True)
    dest = SyntheticKvPool(LAYOUT, 40)
    puller = shm_puller(str(prefill_side.engine.shared.path.parent), verify=False)  # type: ignore[union-attr]
    try:
        expired = dataclasses.replace(handle, lease_deadline_s=time.monotonic() - 0.001)
        with pytest.raises(KvTransferError) as failure:
            await puller.pull(expired, 0, PoolSink(dest, list(range(40))), timeout_s=10)
        assert failure.value.reason == "deadline"
        assert not dest.read_kv(list(range(40)), 0, LAYOUT.num_layers).any()
        assert handle.shared_pool is not None
        missing = dataclasses.replace(handle, shared_pool=dataclasses.replace(handle.shared_pool,
                                                                              segment="tandem-kv-pool-gone"))
        with pytest.raises(KvTransferError) as failure:
            await puller.pull(missing, 0, PoolSink(dest, list(range(40))), timeout_s=10)
        assert failure.value.reason == "shm"  # the decode worker then pulls over gRPC
    finally:
        await puller.close()
        await release(prefill_side, handle)


async def test_pull_from_first_block_skips_the_locally_cached_prefix(prefill_side: PrefillSide) -> None:
    handle, source_ids = await prefill(prefill_side)
    dest = SyntheticKvPool(LAYOUT, 40)
    dest_ids = list(range(40))
    puller = grpc_puller()
    try:
        result = await puller.pull(handle, 12, PoolSink(dest, dest_ids), timeout_s=10)
    finally:
        await puller.close()
    assert result.num_bytes == 28 * LAYOUT.bytes_per_block_layer * LAYOUT.num_layers
    assert_same_blocks(prefill_side.engine, source_ids, dest, dest_ids, first_block=12)
    assert not dest.read_kv(dest_ids[:12], 0, LAYOUT.num_layers).any()  # never written
    await release(prefill_side, handle)


async def test_a_corrupted_chunk_is_detected_and_fetched_again(prefill_side: PrefillSide) -> None:
    handle, source_ids = await prefill(prefill_side)
    corrupted: list[int] = []

    async def flip_a_byte_once(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        if header.sequence_number == 3 and not corrupted:
            corrupted.append(header.sequence_number)
            damaged = bytearray(payload)
            damaged[len(damaged) // 2] ^= 0x40
            return memoryview(bytes(damaged))
        return payload

    dest = SyntheticKvPool(LAYOUT, 40)
    dest_ids = list(range(40))
    puller = grpc_puller(chunk_hook=flip_a_byte_once)
    try:
        result = await puller.pull(handle, 0, PoolSink(dest, dest_ids), timeout_s=10)
    finally:
        await puller.close()
    assert corrupted == [3]
    assert result.num_retried_chunks == 1 and "corrupt" in result.retry_reasons
    assert_same_blocks(prefill_side.engine, source_ids, dest, dest_ids)  # the bad bytes never stayed
    await release(prefill_side, handle)


async def test_a_chunk_corrupt_every_time_fails_after_the_retries(prefill_side: PrefillSide) -> None:
    handle, _ = await prefill(prefill_side)

    async def always_corrupt(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        return memoryview(bytes(len(payload))) if header.sequence_number == 2 else payload

    puller = grpc_puller(chunk_hook=always_corrupt)
    try:
        with pytest.raises(KvTransferError) as failure:
            await puller.pull(handle, 0, PoolSink(SyntheticKvPool(LAYOUT, 40), list(range(40))), timeout_s=10)
    finally:
        await puller.close()
    assert failure.value.reason == "corrupt"
    await release(prefill_side, handle)


async def test_a_stalled_transfer_hits_its_deadline(prefill_side: PrefillSide) -> None:
    handle, _ = await prefill(prefill_side)

    async def stall(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        await asyncio.sleep(0.2)
        return payload

    puller = grpc_puller(chunk_hook=stall)
    try:
        with pytest.raises(KvTransferError) as failure:
            await puller.pull(handle, 0, PoolSink(SyntheticKvPool(LAYOUT, 40), list(range(40))), timeout_s=0.3)
    finally:
        await puller.close()
    assert failure.value.reason == "deadline"
    await release(prefill_side, handle)


async def test_a_released_transfer_cannot_be_pulled(prefill_side: PrefillSide) -> None:
    handle, _ = await prefill(prefill_side)
    await release(prefill_side, handle)
    puller = grpc_puller()
    try:
        with pytest.raises(KvTransferError) as failure:
            await puller.pull(handle, 0, PoolSink(SyntheticKvPool(LAYOUT, 40), list(range(40))), timeout_s=5)
    finally:
        await puller.close()
    assert failure.value.reason == "not_found"


async def test_a_lease_nobody_pulls_expires_and_frees_the_blocks(prefill_side: PrefillSide) -> None:
    leases = prefill_side.servicer.leases
    leases.lease_s = 0.2
    expiry = asyncio.create_task(leases.run_expiry(0.05))
    try:
        handle, _ = await prefill(prefill_side)
        assert prefill_side.engine.stats().num_kv_blocks_used == 40 and handle.lease_ms == 200
        for _ in range(40):
            if not len(leases):
                break
            await asyncio.sleep(0.05)
    finally:
        expiry.cancel()
        leases.lease_s = 30
    assert prefill_side.engine.stats().num_kv_blocks_used == 0
    assert prefill_side.metrics.leases_ended.labels(reason="expired")._value.get() >= 1


async def test_pull_kv_rejects_what_it_cannot_serve(prefill_side: PrefillSide) -> None:
    handle, _ = await prefill(prefill_side)
    try:
        for request in (
            kv_pb2.PullKvRequest(transfer_id=handle.transfer_id, max_chunk_bytes=8 << 20,
                                 transport=kv_pb2.KV_TRANSPORT_GRPC),
            kv_pb2.PullKvRequest(transfer_id=handle.transfer_id, max_chunk_bytes=CHUNK_BYTES, first_block=41,
                                 transport=kv_pb2.KV_TRANSPORT_GRPC),
            kv_pb2.PullKvRequest(transfer_id=handle.transfer_id, max_chunk_bytes=CHUNK_BYTES,
                                 transport=kv_pb2.KV_TRANSPORT_UNSPECIFIED),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in prefill_side.stub.PullKv(request):
                    pass
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await release(prefill_side, handle)
