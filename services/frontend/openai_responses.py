"""Build OpenAI response bodies (completions, chunks, usage, errors) from pipeline outputs; pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tandem.engine.types import FinishReason, TokenLogprob
from tandem.errors import InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True, frozen=True)
class ResponseHeader:
    """What every object of one response shares."""

    id: str
    created: int
    model: str


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


TokenText = Callable[[int], str]  # a token id's own text


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object: one entry per output token with its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText, text_offset: int) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object; ``text_offset`` is where the first token's
    text starts in the completion. Each top_logprobs map holds the alternatives and the drawn token."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{token_text(t): lp for t, lp in e.top}, token: e.logprob}
                             for e, token in zip(entries, tokens, strict=True)],
            "text_offset": offsets}


def prepend_prompt_logprobs(prompt_ids: Sequence[int], scores: Sequence[TokenLogprob], token_text: TokenText,
                            completion: dict[str, Any]) -> dict[str, Any]:
    """``completion`` (a completion_logprobs object) with the echoed prompt's tokens in front: the first
    has no logprob (null, as OpenAI sends it), each other one its score given the tokens before it."""
    tokens = [token_text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    entries: list[TokenLogprob | None] = [None, *scores][: len(tokens)]
    entries += [None] * (len(tokens) - len(entries))
    return {
        "tokens": tokens + completion["tokens"],
        "token_logprobs": [e.logprob if e else None for e in entries] + completion["token_logprobs"],
        "top_logprobs": [{**{token_text(t): lp for t, lp in e.top}, text: e.logprob} if e else None
                         for e, text in zip(entries, tokens, strict=True)] + completion["top_logprobs"],
        "text_offset": offsets + completion["text_offset"],
    }


def chat_completion(header: ResponseHeader, text: str, finish_reason: FinishReason | None,
                    usage: Usage, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": header.id, "object": "chat.completion", "created": header.created, "model": header.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": _finish(finish_reason),
        }],
        "usage": usage.to_dict(),
    }


def chat_chunk(header: ResponseHeader, *, role: str | None = None, content: str | None = None,
               finish_reason: FinishReason | None = None, include_usage: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    chunk: dict[str, Any] = {
        "id": header.id, "object": "chat.completion.chunk", "created": header.created, "model": header.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": _finish(finish_reason)}],
    }
    if include_usage:
        chunk["usage"] = None  # as OpenAI: null on every chunk but the last
    return chunk


def completion(header: ResponseHeader, text: str, finish_reason: FinishReason | None,
               usage: Usage, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": header.id, "object": "text_completion", "created": header.created, "model": header.model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _finish(finish_reason)}],
        "usage": usage.to_dict(),
    }


def completion_chunk(header: ResponseHeader, text: str, finish_reason: FinishReason | None = None,
                     include_usage: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": header.id, "object": "text_completion", "created": header.created, "model": header.model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _finish(finish_reason)}],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(header: ResponseHeader, object_name: str, usage: Usage) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": header.id, "object": object_name, "created": header.created, "model": header.model,
            "choices": [], "usage": usage.to_dict()}


def model_list(model_name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": model_name, "object": "model", "created": created, "owned_by": "tandem",
        "root": model_name, "max_model_len": max_model_len,
    }]}


@dataclass(slots=True, frozen=True)
class ErrorResponse:
    status: int
    body: dict[str, Any]
    retry_after_s: int | None = None


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: TandemError, retry_after_s: int = 1) -> ErrorResponse:
    """The HTTP status and OpenAI error body for a pipeline error; 503s tell the client when to retry."""
    if isinstance(error, InvalidRequest):
        return ErrorResponse(400, error_body(error.message, "invalid_request_error", error.field, "invalid_value"))
    if isinstance(error, NotFound):
        code = "model_not_found" if error.field == "model" else "not_found"
        return ErrorResponse(404, error_body(error.message, "invalid_request_error", error.field, code))
    if isinstance(error, ResourceExhausted):
        # 503, not 429: the server is full, the client did nothing wrong.
        return ErrorResponse(503, error_body(error.message, "server_overloaded", error.field, "overloaded"),
                             retry_after_s)
    if isinstance(error, Unavailable):
        return ErrorResponse(503, error_body(error.message, "service_unavailable", error.field, "unavailable"),
                             retry_after_s)
    return ErrorResponse(500, error_body(error.message, "server_error", error.field, "internal_error"))
