"""KvChunk on the wire without protobuf's extra copies of the payload, and layout conversions.

``encode_chunk`` writes a valid ``tandem.kv.v1.KvChunk``: the small header fields serialised by
protobuf, followed by field 7 (``data``) appended by hand, so the payload is copied once into
the message instead of once into the message object and again when serialising it.
``decode_chunk`` returns the header and a zero-copy view of ``data``. Any protobuf
implementation reads and writes the same bytes.
"""

from __future__ import annotations

from tandem.engine.types import KVLayout
from tandem.proto.kv.v1 import kv_pb2

_DATA_FIELD = 7
_DATA_KEY = bytes([(_DATA_FIELD << 3) | 2])  # field 7, length-delimited


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


def encode_chunk(header: kv_pb2.KvChunk, payload: memoryview | bytes | None) -> bytes:
    """Serialise ``header`` (its ``data`` unset) with ``payload`` as its data field."""
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
