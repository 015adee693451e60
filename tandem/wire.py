"""Engine types <-> ``tandem.common.v1`` messages that more than one service sends or reads."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from tandem.engine.types import SamplingParams, TokenLogprob
from tandem.proto.common.v1 import common_pb2

# How a GenerateStream refusal carries the gRPC status a Generate call would have ended with: the
# worker maps the status to the code, the frontend the code back (anything else travels as INTERNAL).
ERROR_CODE_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: common_pb2.ERROR_CODE_INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: common_pb2.ERROR_CODE_NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED: common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: common_pb2.ERROR_CODE_UNAVAILABLE,
}
STATUS_BY_ERROR_CODE = {code: status for status, code in ERROR_CODE_BY_STATUS.items()}

_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                      "repetition_penalty", "logprobs", "prompt_logprobs")


def sampling_to_proto(sampling: SamplingParams) -> common_pb2.SamplingParams:
    """Unset optional fields are how "until the context is full", "no seed", "no penalty" and "no
    logprobs" travel."""
    message = common_pb2.SamplingParams(
        temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, stop=sampling.stop,
        stop_token_ids=sampling.stop_token_ids, ignore_eos=sampling.ignore_eos, min_tokens=sampling.min_tokens)
    if sampling.max_tokens is not None:
        message.max_tokens = sampling.max_tokens
    for name, off in (("seed", None), ("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                      ("repetition_penalty", 1.0), ("logprobs", None), ("prompt_logprobs", None)):
        if getattr(sampling, name) != off:
            setattr(message, name, getattr(sampling, name))
    return message


def sampling_from_proto(message: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields take the defaults (OpenAI's: temperature 1.0), except max_tokens: unset
    means no limit. Validates; raises InvalidRequest naming the field."""
    kwargs: dict[str, object] = {
        "max_tokens": message.max_tokens if message.HasField("max_tokens") else None,
        "stop": list(message.stop),
        "stop_token_ids": list(message.stop_token_ids),
        "ignore_eos": message.ignore_eos,
        "min_tokens": message.min_tokens,
    }
    for name in _OPTIONAL_SAMPLING:
        if message.HasField(name):
            kwargs[name] = getattr(message, name)
    return SamplingParams(**kwargs)  # type: ignore[arg-type]


def logprob_to_proto(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id, logprob=logprob.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top])


def logprob_from_proto(message: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(message.token_id, message.logprob,
                        tuple((top.token_id, top.logprob) for top in message.top_logprobs))


def logprobs_from_proto(messages: Iterable[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [logprob_from_proto(message) for message in messages]
