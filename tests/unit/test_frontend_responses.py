"""OpenAI response objects and error bodies as clients parse them."""

from __future__ import annotations

import pytest

from services.frontend import openai_responses as responses
from services.frontend.openai_http import request_id_for
from tandem.engine.types import FinishReason, TokenLogprob
from tandem.errors import InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable

pytestmark = pytest.mark.unit

HEADER = responses.ResponseHeader("chatcmpl-1", 1700000000, "m")
USAGE = responses.Usage(prompt_tokens=5, completion_tokens=3, cached_tokens=2)


def test_usage_totals_and_cached_tokens() -> None:
    assert USAGE.to_dict() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                               "prompt_tokens_details": {"cached_tokens": 2}}


def test_chat_completion() -> None:
    body = responses.chat_completion(HEADER, "hello", FinishReason.STOP, USAGE)
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1" and body["model"] == "m"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"]["total_tokens"] == 8


def test_chat_chunks() -> None:
    first = responses.chat_chunk(HEADER, role="assistant", content="")
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first
    last = responses.chat_chunk(HEADER, content="!", finish_reason=FinishReason.LENGTH, include_usage=True)
    assert last["choices"][0]["delta"] == {"content": "!"} and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] is None  # null on every chunk but the usage chunk
    empty = responses.chat_chunk(HEADER, finish_reason=FinishReason.STOP)
    assert empty["choices"][0]["delta"] == {}


def test_usage_chunk_has_no_choices() -> None:
    chunk = responses.usage_chunk(HEADER, "chat.completion.chunk", USAGE)
    assert chunk["choices"] == [] and chunk["usage"]["completion_tokens"] == 3


def test_completion_and_chunk() -> None:
    body = responses.completion(HEADER, "abc", FinishReason.LENGTH, USAGE)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abc" and body["choices"][0]["finish_reason"] == "length"
    chunk = responses.completion_chunk(HEADER, "a")
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["finish_reason"] is None


def test_an_echoed_prompt_comes_first_in_the_logprobs_with_a_null_for_its_first_token() -> None:
    text = {1: "The", 2: " sky", 3: " is", 4: " blue"}.__getitem__
    completion = responses.completion_logprobs([TokenLogprob(4, -0.5, ((4, -0.5), (2, -2.0)))], text, 11)
    scores = [TokenLogprob(2, -3.0, ((3, -1.0),)), TokenLogprob(3, -0.25, ((3, -0.25),))]
    body = responses.prepend_prompt_logprobs([1, 2, 3], scores, text, completion)
    assert body["tokens"] == ["The", " sky", " is", " blue"]
    assert body["token_logprobs"] == [None, -3.0, -0.25, -0.5]
    assert body["top_logprobs"] == [None, {" is": -1.0, " sky": -3.0}, {" is": -0.25}, {" blue": -0.5, " sky": -2.0}]
    assert body["text_offset"] == [0, 3, 7, 11]
    # Without scores (echo of a prompt not scored) every prompt token's logprob is null.
    bare = responses.prepend_prompt_logprobs([1, 2], [], text, completion)
    assert bare["token_logprobs"] == [None, None, -0.5] and bare["top_logprobs"][:2] == [None, None]


def test_model_list() -> None:
    body = responses.model_list("m", 1, 8192)
    assert body["object"] == "list" and body["data"][0]["id"] == "m" and body["data"][0]["max_model_len"] == 8192


@pytest.mark.parametrize(("error", "status", "error_type", "code", "retry"), [
    (InvalidRequest("bad", "top_p"), 400, "invalid_request_error", "invalid_value", None),
    (NotFound("no such model", "model"), 404, "invalid_request_error", "model_not_found", None),
    (Unavailable("no worker"), 503, "service_unavailable", "unavailable", 1),
    (ResourceExhausted("queue full"), 503, "server_overloaded", "overloaded", 1),
    (TandemError("boom"), 500, "server_error", "internal_error", None),
])
def test_error_mapping(error: TandemError, status: int, error_type: str, code: str, retry: int | None) -> None:
    response = responses.error_response(error, retry_after_s=1)
    assert response.status == status and response.retry_after_s == retry
    assert response.body == {"error": {"message": error.message, "type": error_type, "param": error.field,
                                       "code": code}}


def test_request_id_is_kept_when_safe_and_generated_otherwise() -> None:
    assert request_id_for("abc-123") == "abc-123"
    for unsafe in (None, "", "has space", "x" * 200, "naïve"):
        generated = request_id_for(unsafe)
        assert generated.startswith("cmpl-") and len(generated) == len("cmpl-") + 32
