"""Engine types <-> ``tandem.common.v1`` messages that more than one service sends or reads."""

from __future__ import annotations

from collections.abc import Iterable

from tandem.engine.types import TokenLogprob
from tandem.proto.common.v1 import common_pb2


def logprob_to_proto(logprob: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=logprob.token_id, logprob=logprob.logprob,
        top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top])


def logprob_from_proto(message: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(message.token_id, message.logprob,
                        tuple((top.token_id, top.logprob) for top in message.top_logprobs))


def logprobs_from_proto(messages: Iterable[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [logprob_from_proto(message) for message in messages]
