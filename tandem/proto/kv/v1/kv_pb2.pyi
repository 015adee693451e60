from tandem.proto.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_TRANSPORT_UNSPECIFIED: _ClassVar[KvTransport]
    KV_TRANSPORT_GRPC: _ClassVar[KvTransport]
    KV_TRANSPORT_SHM: _ClassVar[KvTransport]
KV_TRANSPORT_UNSPECIFIED: KvTransport
KV_TRANSPORT_GRPC: KvTransport
KV_TRANSPORT_SHM: KvTransport

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "num_resumed_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_RESUMED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    num_resumed_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_resumed_output_tokens: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "finish_reason", "handle", "num_prompt_tokens", "num_cached_tokens", "first_token_logprob")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    finish_reason: _common_pb2.FinishReason
    handle: KvHandle
    num_prompt_tokens: int
    num_cached_tokens: int
    first_token_logprob: _common_pb2.TokenLogprob
    def __init__(self, first_token_id: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., handle: _Optional[_Union[KvHandle, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., first_token_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ...) -> None: ...

class KvHandle(_message.Message):
    __slots__ = ("transfer_id", "address", "layout", "num_blocks", "num_tokens", "lease_ms", "host_id", "shared_pool", "block_ids", "pull_addresses")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_POOL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    PULL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    address: str
    layout: KvLayout
    num_blocks: int
    num_tokens: int
    lease_ms: int
    host_id: str
    shared_pool: SharedKvPool
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    pull_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transfer_id: _Optional[str] = ..., address: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., num_blocks: _Optional[int] = ..., num_tokens: _Optional[int] = ..., lease_ms: _Optional[int] = ..., host_id: _Optional[str] = ..., shared_pool: _Optional[_Union[SharedKvPool, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., pull_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class SharedKvPool(_message.Message):
    __slots__ = ("segment", "segment_size", "k_offset", "v_offset", "num_slots")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    K_OFFSET_FIELD_NUMBER: _ClassVar[int]
    V_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    segment_size: int
    k_offset: int
    v_offset: int
    num_slots: int
    def __init__(self, segment: _Optional[str] = ..., segment_size: _Optional[int] = ..., k_offset: _Optional[int] = ..., v_offset: _Optional[int] = ..., num_slots: _Optional[int] = ...) -> None: ...

class PullKvRequest(_message.Message):
    __slots__ = ("transfer_id", "first_block", "max_chunk_bytes", "sequence_numbers", "transport", "skip_checksum")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SKIP_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    first_block: int
    max_chunk_bytes: int
    sequence_numbers: _containers.RepeatedScalarFieldContainer[int]
    transport: KvTransport
    skip_checksum: bool
    def __init__(self, transfer_id: _Optional[str] = ..., first_block: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., sequence_numbers: _Optional[_Iterable[int]] = ..., transport: _Optional[_Union[KvTransport, str]] = ..., skip_checksum: _Optional[bool] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("sequence_number", "layer_start", "num_layers", "block_start", "num_blocks", "crc32c", "data", "shm")
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_START_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    sequence_number: int
    layer_start: int
    num_layers: int
    block_start: int
    num_blocks: int
    crc32c: int
    data: bytes
    shm: ShmSlice
    def __init__(self, sequence_number: _Optional[int] = ..., layer_start: _Optional[int] = ..., num_layers: _Optional[int] = ..., block_start: _Optional[int] = ..., num_blocks: _Optional[int] = ..., crc32c: _Optional[int] = ..., data: _Optional[bytes] = ..., shm: _Optional[_Union[ShmSlice, _Mapping]] = ...) -> None: ...

class ShmSlice(_message.Message):
    __slots__ = ("segment", "offset", "length", "segment_size")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    length: int
    segment_size: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., segment_size: _Optional[int] = ...) -> None: ...

class ReleaseKvRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class ReleaseKvResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class HoldKvRequest(_message.Message):
    __slots__ = ("transfer_id", "bytes_sent", "chunks_sent")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_SENT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    bytes_sent: int
    chunks_sent: int
    def __init__(self, transfer_id: _Optional[str] = ..., bytes_sent: _Optional[int] = ..., chunks_sent: _Optional[int] = ...) -> None: ...

class HoldKvResponse(_message.Message):
    __slots__ = ("block_ids", "num_tokens", "layout")
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    layout: KvLayout
    def __init__(self, block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ...) -> None: ...

class PullIntoRequest(_message.Message):
    __slots__ = ("transfer_id", "address", "layout", "num_blocks", "first_block", "max_chunk_bytes", "sequence_numbers", "target_block_ids", "timeout_s", "stop")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    address: str
    layout: KvLayout
    num_blocks: int
    first_block: int
    max_chunk_bytes: int
    sequence_numbers: _containers.RepeatedScalarFieldContainer[int]
    target_block_ids: _containers.RepeatedScalarFieldContainer[int]
    timeout_s: float
    stop: bool
    def __init__(self, transfer_id: _Optional[str] = ..., address: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., num_blocks: _Optional[int] = ..., first_block: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., sequence_numbers: _Optional[_Iterable[int]] = ..., target_block_ids: _Optional[_Iterable[int]] = ..., timeout_s: _Optional[float] = ..., stop: _Optional[bool] = ...) -> None: ...

class PullIntoResponse(_message.Message):
    __slots__ = ("sequence_number", "problem")
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    sequence_number: int
    problem: str
    def __init__(self, sequence_number: _Optional[int] = ..., problem: _Optional[str] = ...) -> None: ...
