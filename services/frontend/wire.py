"""Translation between the frontend's domain types and the tandem.common.v1 protobuf messages."""

from __future__ import annotations

from tandem.engine.types import FinishReason
from tandem.proto.common.v1 import common_pb2
from tandem.wire import sampling_from_proto, sampling_to_proto

__all__ = ["finish_reason_from_proto", "finish_reason_to_proto", "sampling_from_proto", "sampling_to_proto"]

_FINISH_FROM_PROTO: dict[common_pb2.FinishReason, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_FINISH_TO_PROTO = {reason: proto for proto, reason in _FINISH_FROM_PROTO.items()}


def finish_reason_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(value)  # type: ignore[call-overload]


def finish_reason_to_proto(reason: FinishReason | None) -> common_pb2.FinishReason:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]
