from tandem.proto.common.v1 import common_pb2 as _common_pb2
from tandem.proto.worker.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]

class KvEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_EVENT_KIND_UNSPECIFIED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_STORED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_REMOVED: _ClassVar[KvEventKind]
    KV_EVENT_KIND_CLEARED: _ClassVar[KvEventKind]

class WorkerFailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_FAILURE_KIND_UNSPECIFIED: _ClassVar[WorkerFailureKind]
    WORKER_FAILURE_KIND_UNREACHABLE: _ClassVar[WorkerFailureKind]
    WORKER_FAILURE_KIND_STALLED: _ClassVar[WorkerFailureKind]
    WORKER_FAILURE_KIND_STREAM_BROKEN: _ClassVar[WorkerFailureKind]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
KV_EVENT_KIND_UNSPECIFIED: KvEventKind
KV_EVENT_KIND_STORED: KvEventKind
KV_EVENT_KIND_REMOVED: KvEventKind
KV_EVENT_KIND_CLEARED: KvEventKind
WORKER_FAILURE_KIND_UNSPECIFIED: WorkerFailureKind
WORKER_FAILURE_KIND_UNREACHABLE: WorkerFailureKind
WORKER_FAILURE_KIND_STALLED: WorkerFailureKind
WORKER_FAILURE_KIND_STREAM_BROKEN: WorkerFailureKind

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "model", "max_model_len", "block_size", "publishes_kv_events", "process")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHES_KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    model: str
    max_model_len: int
    block_size: int
    publishes_kv_events: bool
    process: ProcessIdentity
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., max_model_len: _Optional[int] = ..., block_size: _Optional[int] = ..., publishes_kv_events: _Optional[bool] = ..., process: _Optional[_Union[ProcessIdentity, _Mapping]] = ...) -> None: ...

class ProcessIdentity(_message.Message):
    __slots__ = ("pid_namespace", "pid", "start_ticks")
    PID_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    START_TICKS_FIELD_NUMBER: _ClassVar[int]
    pid_namespace: str
    pid: int
    start_ticks: int
    def __init__(self, pid_namespace: _Optional[str] = ..., pid: _Optional[int] = ..., start_ticks: _Optional[int] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "token_ids", "exclude_worker_ids", "overrides", "block_hashes", "block_size")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    exclude_worker_ids: _containers.RepeatedScalarFieldContainer[str]
    overrides: RoutingOverrides
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    block_size: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., exclude_worker_ids: _Optional[_Iterable[str]] = ..., overrides: _Optional[_Union[RoutingOverrides, _Mapping]] = ..., block_hashes: _Optional[_Iterable[int]] = ..., block_size: _Optional[int] = ...) -> None: ...

class RoutingOverrides(_message.Message):
    __slots__ = ("kv_overlap_weight", "kv_temperature")
    KV_OVERLAP_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KV_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    kv_overlap_weight: float
    kv_temperature: float
    def __init__(self, kv_overlap_weight: _Optional[float] = ..., kv_temperature: _Optional[float] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("worker_id", "address", "prefill", "only_candidate")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    ONLY_CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    prefill: _worker_pb2.PrefillHint
    only_candidate: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., prefill: _Optional[_Union[_worker_pb2.PrefillHint, _Mapping]] = ..., only_candidate: _Optional[bool] = ...) -> None: ...

class RouteStreamRequest(_message.Message):
    __slots__ = ("call_id", "route")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    route: RouteRequest
    def __init__(self, call_id: _Optional[int] = ..., route: _Optional[_Union[RouteRequest, _Mapping]] = ...) -> None: ...

class RouteStreamResponse(_message.Message):
    __slots__ = ("call_id", "route", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    route: RouteResponse
    error: _common_pb2.ErrorDetail
    def __init__(self, call_id: _Optional[int] = ..., route: _Optional[_Union[RouteResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("register", "load", "kv_events", "kv_snapshot", "progress")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    KV_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    register: WorkerInfo
    load: _worker_pb2.WorkerLoad
    kv_events: KvEventBatch
    kv_snapshot: KvSnapshotChunk
    progress: RequestProgress
    def __init__(self, register: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[_worker_pb2.WorkerLoad, _Mapping]] = ..., kv_events: _Optional[_Union[KvEventBatch, _Mapping]] = ..., kv_snapshot: _Optional[_Union[KvSnapshotChunk, _Mapping]] = ..., progress: _Optional[_Union[RequestProgress, _Mapping]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("registered", "send_kv_snapshot")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    SEND_KV_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    registered: bool
    send_kv_snapshot: bool
    def __init__(self, registered: _Optional[bool] = ..., send_kv_snapshot: _Optional[bool] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("event_id", "kind", "block_hashes")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    event_id: int
    kind: KvEventKind
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, event_id: _Optional[int] = ..., kind: _Optional[_Union[KvEventKind, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class KvEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ...) -> None: ...

class KvSnapshotChunk(_message.Message):
    __slots__ = ("last_event_id", "block_hashes", "more")
    LAST_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    last_event_id: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    more: bool
    def __init__(self, last_event_id: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ..., more: _Optional[bool] = ...) -> None: ...

class RequestProgress(_message.Message):
    __slots__ = ("first_token_request_ids", "finished_request_ids")
    FIRST_TOKEN_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    first_token_request_ids: _containers.RepeatedScalarFieldContainer[str]
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, first_token_request_ids: _Optional[_Iterable[str]] = ..., finished_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("info", "load", "healthy", "unhealthy_reason")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_REASON_FIELD_NUMBER: _ClassVar[int]
    info: WorkerInfo
    load: _worker_pb2.WorkerLoad
    healthy: bool
    unhealthy_reason: str
    def __init__(self, info: _Optional[_Union[WorkerInfo, _Mapping]] = ..., load: _Optional[_Union[_worker_pb2.WorkerLoad, _Mapping]] = ..., healthy: _Optional[bool] = ..., unhealthy_reason: _Optional[str] = ...) -> None: ...

class ReportWorkerFailureRequest(_message.Message):
    __slots__ = ("worker_id", "address", "kind", "detected_after_s", "detail")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    kind: WorkerFailureKind
    detected_after_s: float
    detail: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., kind: _Optional[_Union[WorkerFailureKind, str]] = ..., detected_after_s: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportWorkerFailureResponse(_message.Message):
    __slots__ = ("quarantined",)
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    quarantined: bool
    def __init__(self, quarantined: _Optional[bool] = ...) -> None: ...
