"""Translation between the frontend's domain types and the tandem.common.v1 protobuf messages."""

from __future__ import annotations

from tandem.engine.types import FinishReason, SamplingParams
from tandem.proto.common.v1 import common_pb2

_FINISH_FROM_PROTO: dict[common_pb2.FinishReason, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
    common_pb2.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_FINISH_TO_PROTO = {reason: proto for proto, reason in _FINISH_FROM_PROTO.items()}


def sampling_to_proto(sampling: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids,
        ignore_eos=sampling.ignore_eos,
        min_tokens=sampling.min_tokens,
    )
    for name, off in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
        if getattr(sampling, name) != off:
            setattr(message, name, getattr(sampling, name))
    # Optional fields: leaving them unset is how "until the context is full" / "no seed" travel.
    if sampling.max_tokens is not None:
        message.max_tokens = sampling.max_tokens
    if sampling.seed is not None:
        message.seed = sampling.seed
    if sampling.logprobs is not None:
        message.logprobs = sampling.logprobs
    return message


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    """Unset fields take OpenAI's defaults (temperature 1.0, no max_tokens). Raises InvalidRequest."""
    return SamplingParams(
        max_tokens=message.max_tokens if message.HasField("max_tokens") else None,
        temperature=message.temperature if message.HasField("temperature") else 1.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k if message.HasField("top_k") else 0,
        seed=message.seed if message.HasField("seed") else None,
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        presence_penalty=message.presence_penalty if message.HasField("presence_penalty") else 0.0,
        frequency_penalty=message.frequency_penalty if message.HasField("frequency_penalty") else 0.0,
        repetition_penalty=message.repetition_penalty if message.HasField("repetition_penalty") else 1.0,
        min_tokens=message.min_tokens,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
    )


def finish_reason_from_proto(value: int) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(value)  # type: ignore[call-overload]


def finish_reason_to_proto(reason: FinishReason | None) -> common_pb2.FinishReason:
    if reason is None:
        return common_pb2.FINISH_REASON_UNSPECIFIED
    return _FINISH_TO_PROTO[reason]
