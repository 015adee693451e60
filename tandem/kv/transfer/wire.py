"""KvChunk on the wire without protobuf's copies of the payload, and layout conversions.

``ChunkMessage`` builds a valid ``tandem.kv.v1.KvChunk`` in place: field 7 (``data``) first, so the
sender gathers the blocks straight into the bytes object gRPC sends, then the small header fields,
then the fixed-width ``crc32c``, written last. ``encode_chunk`` appends a payload to a header (one
copy). ``decode_chunk`` returns the header and a zero-copy view of ``data``. Protobuf readers accept
fields in any order, so any implementation reads the same message.
"""

from __future__ import annotations

import ctypes
import struct

from tandem.engine.types import KVLayout
from tandem.kv.transfer.protocol import TransferHandle
from tandem.kv.transfer.shared_pool import SharedPoolInfo
from tandem.proto.kv.v1 import kv_pb2

_DATA_FIELD = 7
_DATA_KEY = bytes([(_DATA_FIELD << 3) | 2])  # field 7, length-delimited
_CRC_KEY = bytes([(9 << 3) | 5])  # field 9 (crc32c), fixed32
_CRC_FIELD_BYTES = len(_CRC_KEY) + 4

# CPython's own constructor of a bytes object whose contents the caller fills in before anyone
# else sees it; bytes(n) would zero it first, costing another pass over the payload.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(view):
            raise ValueError("truncated varint in KvChunk")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


class ChunkMessage:
    """One encoded KvChunk being filled: write the payload through ``payload``, then ``finish``.

    gRPC's Python API sends only ``bytes`` and copies them once more into its own buffers; writing
    the gathered blocks straight into that ``bytes`` object saves the copy that joining a header
    and a payload costs. The object is private to this class until ``finish`` returns it.
    """

    def __init__(self, header: kv_pb2.KvChunk, payload_size: int) -> None:
        head = header.SerializeToString()  # small fields only: data and crc32c are unset
        prefix = _DATA_KEY + _varint(payload_size)
        size = len(prefix) + payload_size + len(head) + _CRC_FIELD_BYTES
        self._raw: bytes = _new_bytes(None, size)
        view = memoryview((ctypes.c_char * size).from_address(_bytes_address(self._raw))).cast("B")
        end = len(prefix) + payload_size
        view[: len(prefix)] = prefix
        view[end : end + len(head)] = head
        view[end + len(head) : end + len(head) + len(_CRC_KEY)] = _CRC_KEY
        self.payload = view[len(prefix) : end]  # writable; write nothing through it after finish()
        self._crc = view[size - 4 :]

    def finish(self, crc: int) -> bytes:
        """Write the checksum and hand over the message."""
        struct.pack_into("<I", self._crc, 0, crc)
        return self._raw


def encode_chunk(header: kv_pb2.KvChunk, payload: memoryview | bytes | None) -> bytes:
    """Serialise ``header`` (its ``data`` unset) with ``payload`` appended as its data field."""
    head = header.SerializeToString()
    if payload is None or len(payload) == 0:
        return head
    return b"".join((head, _DATA_KEY, _varint(len(payload)), payload))


def decode_chunk(raw: bytes) -> tuple[kv_pb2.KvChunk, memoryview]:
    """The header fields (``data`` left empty) and a view of the data bytes inside ``raw``."""
    view = memoryview(raw)
    pos = 0
    key_start = start = end = 0
    while pos < len(view):
        field_start = pos
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type == 2:
            length, value_start = _read_varint(view, pos)
            pos = value_start + length
            if field == _DATA_FIELD:
                key_start, start, end = field_start, value_start, pos
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in KvChunk")
    if pos != len(view):
        raise ValueError("truncated KvChunk")
    if end == 0:
        return kv_pb2.KvChunk.FromString(raw), view[0:0]
    # The header is what surrounds the data field: tiny, so parsing a copy of it costs nothing.
    header_bytes = bytes(view[:key_start]) + bytes(view[end:])
    return kv_pb2.KvChunk.FromString(header_bytes), view[start:end]


def layout_to_proto(layout: KVLayout) -> kv_pb2.KvLayout:
    return kv_pb2.KvLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                           head_dim=layout.head_dim, block_size=layout.block_size, dtype=layout.dtype)


def layout_from_proto(message: kv_pb2.KvLayout) -> KVLayout:
    return KVLayout(num_layers=message.num_layers, num_kv_heads=message.num_kv_heads,
                    head_dim=message.head_dim, block_size=message.block_size, dtype=message.dtype)


def shared_pool_to_proto(info: SharedPoolInfo) -> kv_pb2.SharedKvPool:
    return kv_pb2.SharedKvPool(segment=info.segment, segment_size=info.segment_size, k_offset=info.k_offset,
                               v_offset=info.v_offset, num_slots=info.num_slots)


def handle_from_proto(message: kv_pb2.KvHandle, address: str, lease_deadline_s: float | None) -> TransferHandle:
    """The domain handle; ``address`` stands in when the message has none, ``lease_deadline_s`` is the
    caller's bound on the lease (``time.monotonic()`` when it sent Prefill, plus the lease)."""
    pool = message.shared_pool if message.HasField("shared_pool") else None
    return TransferHandle(
        transfer_id=message.transfer_id, address=message.address or address, layout=layout_from_proto(message.layout),
        num_blocks=message.num_blocks, num_tokens=message.num_tokens, lease_ms=message.lease_ms,
        host_id=message.host_id, block_ids=tuple(message.block_ids), lease_deadline_s=lease_deadline_s,
        pull_addresses=tuple(message.pull_addresses),
        shared_pool=None if pool is None else SharedPoolInfo(pool.segment, pool.segment_size, pool.k_offset,
                                                             pool.v_offset, pool.num_slots))
