"""KV transfer pieces without sockets: chunk plans, the KvChunk codec, leases, settings, segments, shared pools."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from tandem.engine.types import KVLayout
from tandem.kv.transfer.chunks import (
    ChunkPlanError,
    checksum,
    chunk_shape,
    plan_chunks,
    tensor_bytes,
    tensor_from_bytes,
)
from tandem.kv.transfer.leases import EXPIRED, RELEASED, Lease, LeaseTable
from tandem.kv.transfer.settings import MAX_CHUNK_BYTES, PullSettings
from tandem.kv.transfer.shared_pool import SharedKvPool, copy_blocks, map_pool
from tandem.kv.transfer.shm import SegmentPool, SegmentReader
from tandem.kv.transfer.synthetic import SyntheticKvPool
from tandem.kv.transfer.wire import (
    ChunkMessage,
    decode_chunk,
    encode_chunk,
    layout_from_proto,
    layout_to_proto,
)
from tandem.proto.kv.v1 import kv_pb2

pytestmark = pytest.mark.unit

SMOL = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype="float32")  # 720 KiB a block
QWEN_05B = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")


@pytest.mark.parametrize("layout", [SMOL, QWEN_05B])
@pytest.mark.parametrize("max_chunk_bytes", [64 * 1024, 1024 * 1024, MAX_CHUNK_BYTES])
@pytest.mark.parametrize("num_blocks,first_block", [(1, 0), (17, 0), (512, 0), (512, 100), (9, 9)])
def test_a_plan_covers_every_block_of_every_layer_once_within_the_bound(
        layout: KVLayout, max_chunk_bytes: int, num_blocks: int, first_block: int) -> None:
    plan = plan_chunks(layout, num_blocks, first_block, max_chunk_bytes)
    covered: dict[tuple[int, int], int] = {}
    offset = 0
    for index, chunk in enumerate(plan):
        assert chunk.sequence_number == index
        assert 0 < chunk.num_bytes <= max_chunk_bytes
        assert chunk.num_bytes == layout.bytes_per_block_layer * chunk.num_layers * chunk.num_blocks
        assert chunk.offset == offset
        offset += chunk.num_bytes
        for block in range(chunk.block_start, chunk.block_start + chunk.num_blocks):
            for layer in range(chunk.layer_start, chunk.layer_start + chunk.num_layers):
                covered[(block, layer)] = covered.get((block, layer), 0) + 1
    expected = {(b, la) for b in range(first_block, num_blocks) for la in range(layout.num_layers)}
    assert set(covered) == expected and set(covered.values()) <= {1}


def test_whole_blocks_of_all_layers_when_they_fit_else_groups_of_layers() -> None:
    big = plan_chunks(QWEN_05B, 40, 0, 1024 * 1024)  # 192 KiB a block: 5 blocks a chunk
    assert {(c.num_layers, c.num_blocks) for c in big} == {(24, 5)}
    small = plan_chunks(SMOL, 2, 0, 64 * 1024)  # 24 KiB a block-layer: 2 layers a chunk
    assert [(c.block_start, c.layer_start, c.num_layers) for c in small[:3]] == [(0, 0, 2), (0, 2, 2), (0, 4, 2)]


def test_impossible_plans_name_the_problem() -> None:
    with pytest.raises(ChunkPlanError, match="smaller than one block of one layer"):
        plan_chunks(SMOL, 4, 0, 1000)
    with pytest.raises(ChunkPlanError, match="first_block 5"):
        plan_chunks(SMOL, 4, 5, 1 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_bytes_round_trip_through_a_tensor_view(dtype: torch.dtype) -> None:
    layout = KVLayout(4, 2, 8, 16, "float32" if dtype == torch.float32 else "bfloat16")
    chunk = plan_chunks(layout, 3, 0, 1 << 20)[0]
    data = torch.randn(chunk_shape(layout, chunk)).to(dtype)
    raw = bytes(tensor_bytes(data))
    assert len(raw) == chunk.num_bytes
    assert torch.equal(tensor_from_bytes(raw, layout, chunk), data)
    with pytest.raises(ValueError, match="expected"):
        tensor_from_bytes(raw[:-2], layout, chunk)


def test_encoded_chunks_are_plain_protobuf_and_decode_without_copying_the_data() -> None:
    payload = bytes(range(256)) * 5000
    header = kv_pb2.KvChunk(sequence_number=7, layer_start=2, num_layers=3, block_start=300, num_blocks=1,
                            crc32c=checksum(payload))
    raw = encode_chunk(header, memoryview(payload))
    parsed = kv_pb2.KvChunk.FromString(raw)  # any protobuf reader sees the same message
    assert parsed.sequence_number == 7 and parsed.block_start == 300 and parsed.data == payload
    decoded, data = decode_chunk(raw)
    assert decoded.sequence_number == 7 and decoded.crc32c == header.crc32c and not decoded.data
    assert bytes(data) == payload and data.obj is raw  # a view into the received message
    # Messages protobuf itself wrote (data anywhere, shm slices, no data) decode the same way.
    shm = kv_pb2.KvChunk(sequence_number=1, shm=kv_pb2.ShmSlice(segment="tandem-kv-1", offset=5, length=9))
    decoded, data = decode_chunk(encode_chunk(shm, None))
    assert decoded == shm and len(data) == 0
    decoded, data = decode_chunk(kv_pb2.KvChunk(data=b"abc", num_layers=2).SerializeToString())
    assert bytes(data) == b"abc" and decoded.num_layers == 2


@pytest.mark.parametrize("crc", [0, 1, 0xFFFFFFFF])
def test_a_chunk_message_is_gathered_in_place_and_any_protobuf_reader_sees_it(crc: int) -> None:
    layout = KVLayout(4, 2, 8, 16, "bfloat16")
    chunk = plan_chunks(layout, 3, 0, 1 << 20)[0]
    data = torch.randn(chunk_shape(layout, chunk)).to(torch.bfloat16)
    message = ChunkMessage(kv_pb2.KvChunk(sequence_number=4, num_layers=4, num_blocks=3), chunk.num_bytes)
    tensor_from_bytes(message.payload, layout, chunk).copy_(data)  # what the exporter's gather does
    raw = message.finish(crc)
    parsed = kv_pb2.KvChunk.FromString(raw)
    assert (parsed.sequence_number, parsed.num_layers, parsed.num_blocks, parsed.crc32c) == (4, 4, 3, crc)
    assert parsed.data == bytes(tensor_bytes(data))
    decoded, payload = decode_chunk(raw)
    assert decoded.crc32c == crc and torch.equal(tensor_from_bytes(payload, layout, chunk), data)


def test_the_checksum_catches_a_flipped_bit_anywhere() -> None:
    payload = bytearray(torch.randn(64 * 1024).numpy().tobytes())
    good = checksum(payload)
    assert checksum(bytes(payload)) == good == checksum(memoryview(payload))
    for position in (0, 1, len(payload) // 2, len(payload) - 1):
        payload[position] ^= 0x04
        assert checksum(payload) != good
        payload[position] ^= 0x04


def test_truncated_chunks_are_rejected() -> None:
    raw = encode_chunk(kv_pb2.KvChunk(sequence_number=1), memoryview(b"x" * 100))
    with pytest.raises(ValueError):
        decode_chunk(raw[:-10])


def test_layout_converts_both_ways() -> None:
    assert layout_from_proto(layout_to_proto(QWEN_05B)) == QWEN_05B


@pytest.mark.parametrize("kwargs,setting", [
    ({"max_chunk_bytes": 8 << 20}, "max_chunk_bytes"), ({"num_streams": 0}, "num_streams"),
    ({"max_retries": -1}, "max_retries"), ({"retry_backoff_s": -1.0}, "retry_backoff_s"),
])
def test_pull_settings_name_the_bad_setting(kwargs: dict[str, object], setting: str) -> None:
    with pytest.raises(ValueError, match=f"invalid KV transfer setting {setting}"):
        PullSettings(**kwargs)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leases_free_once_on_release_on_expiry_and_never_while_pulled() -> None:
    clock = FakeClock()
    freed: list[tuple[str, str]] = []

    async def on_free(lease: Lease, reason: str) -> None:
        freed.append((lease.transfer_id, reason))

    async def scenario() -> None:
        table = LeaseTable(10.0, on_free, clock=clock)
        table.add("a", "req-a", [1, 2], 20)
        busy = table.add("b", "req-b", [3], 5)
        table.add("c", "req-c", [4, 5, 6], 40)
        assert table.num_blocks == 6
        with pytest.raises(ValueError):
            table.add("a", "again", [7], 1)
        assert await table.release("a", RELEASED) is True
        assert await table.release("a", RELEASED) is False
        clock.now += 10.5
        with table.pulling(busy):
            assert await table.expire() == 1  # c expires; b is being pulled
        assert await table.expire() == 1  # b, once its pull ended
        assert len(table) == 0

    asyncio.run(scenario())
    assert freed == [("a", RELEASED), ("c", EXPIRED), ("b", EXPIRED)]


def test_segments_are_reused_read_through_a_reader_and_unlinked(tmp_path: Path) -> None:
    pool = SegmentPool(str(tmp_path), max_free_bytes=4 << 20)
    first = pool.acquire("t1", 1500 * 1024)
    assert first.size == 2 << 20 and (tmp_path / first.name).exists()
    first.view(10, 5)[:] = b"hello"
    reader = SegmentReader(str(tmp_path))
    assert bytes(reader.view(first.name, first.size, 10, 5)) == b"hello"
    pool.release("t1")
    assert pool.acquire("t2", 1200 * 1024) is first  # the free segment fits: reused, pages already touched
    bigger = pool.acquire("t2", 3 << 20)  # grown: the old one goes back to the free list
    assert bigger is not first and pool.num_bytes == (2 << 20) + (3 << 20)
    pool.release("t2")  # 5 MiB free > 4 MiB: the oldest is unlinked
    assert not (tmp_path / first.name).exists() and (tmp_path / bigger.name).exists()
    with pytest.raises(ValueError, match="not a KV segment"):
        reader.view("../etc/passwd", 10, 0, 1)
    reader.close()
    pool.close()
    assert list(tmp_path.iterdir()) == []


def test_blocks_copy_pool_to_pool_through_a_shared_mapping(tmp_path: Path) -> None:
    layout = KVLayout(3, 2, 8, 4, "float32")
    source = SyntheticKvPool(layout, 12, shm_dir=str(tmp_path))
    assert source.shared is not None
    source.fill(list(range(12)), seed=3)
    reader = SegmentReader(str(tmp_path))
    k, v = map_pool(reader, source.shared.info, layout)
    target = SyntheticKvPool(layout, 10)
    source_ids, target_ids = [2, 3, 4, 9, 0], [5, 6, 7, 1, 8]  # runs and single blocks
    copy_blocks(k, v, source_ids, target.k_cache, target.v_cache, target_ids, layout.block_size)
    assert torch.equal(source.read_kv(source_ids, 0, 3), target.read_kv(target_ids, 0, 3))
    untouched = [0, 2, 3, 4, 9]
    assert not target.read_kv(untouched, 0, 3).any()
    with pytest.raises(ValueError, match="outside the pool"):
        copy_blocks(k, v, [12], target.k_cache, target.v_cache, [0], layout.block_size)
    source.close()
    assert not list(tmp_path.iterdir())  # the creator removed the file; the mapping still reads
    assert torch.equal(k, source.k_cache)
    reader.close()


def test_a_pool_description_that_does_not_fit_the_layout_is_refused(tmp_path: Path) -> None:
    layout = KVLayout(2, 1, 8, 4, "float32")
    pool = SharedKvPool(str(tmp_path), layout, 16)
    reader = SegmentReader(str(tmp_path))
    bigger = KVLayout(4, 1, 8, 4, "float32")
    with pytest.raises(ValueError, match="does not hold"):
        map_pool(reader, pool.info, bigger)
    pool.close()
    with pytest.raises(OSError):
        map_pool(reader, pool.info, layout)  # gone, and never mapped here
