"""Parse and validate OpenAI chat/completions request bodies into domain types; pure, no I/O."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from services.frontend.messages import normalise_messages
from tandem.engine.types import MAX_LOGPROBS, SamplingParams
from tandem.errors import InvalidRequest

MAX_TEMPERATURE = 2.0  # OpenAI's upper bound
MAX_CHOICES = 16  # n: choices per request
MAX_BATCH_CHOICES = 64  # completions: prompts in one request times n


@dataclass(slots=True)
class ChatCompletionRequest:
    model: str | None
    messages: list[dict[str, str]]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None
    n: int = 1


@dataclass(slots=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # one, or a batch: n choices for each, in order
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    user: str | None
    n: int = 1
    echo: bool = False  # the prompt goes first in the text (and its logprobs first in logprobs)

    @property
    def prompt(self) -> str | list[int]:
        """The first (or only) prompt."""
        return self.prompts[0]


@dataclass(slots=True)
class TokenizeRequest:
    """vLLM's /tokenize: a prompt (``text``) or chat ``messages``, never both."""

    model: str | None
    text: str | None
    messages: list[dict[str, str]] | None
    add_special_tokens: bool
    add_generation_prompt: bool
    return_token_strs: bool


def parse_tokenize_request(body: Any) -> TokenizeRequest:
    body = _require_object(body)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise InvalidRequest("send either prompt (a string) or messages (a chat), not both or neither",
                             "messages" if has_messages else "prompt")
    add_special = _optional(body, "add_special_tokens", bool)
    add_generation = _optional(body, "add_generation_prompt", bool)
    return TokenizeRequest(
        model=_optional(body, "model", str),
        text=_optional(body, "prompt", str),
        messages=normalise_messages(body["messages"]) if has_messages else None,
        add_special_tokens=True if add_special is None else add_special,
        add_generation_prompt=True if add_generation is None else add_generation,
        return_token_strs=bool(_optional(body, "return_token_strs", bool)),
    )


def parse_detokenize_request(body: Any) -> tuple[str | None, list[int]]:
    """vLLM's /detokenize: (model, token ids)."""
    body = _require_object(body)
    return _optional(body, "model", str), _parse_token_ids(body.get("tokens"), "tokens", allow_empty=True)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    body = _require_object(body)
    if "messages" not in body:
        raise InvalidRequest("messages is required", "messages")
    stream, include_usage = _parse_stream(body)
    return ChatCompletionRequest(
        model=_optional(body, "model", str),
        messages=normalise_messages(body["messages"]),
        sampling=parse_sampling(body, chat=True),
        stream=stream,
        include_usage=include_usage,
        user=_optional(body, "user", str),
        n=_parse_n(body),
    )


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _require_object(body)
    stream, include_usage = _parse_stream(body)
    echo = bool(_optional(body, "echo", bool))
    sampling = parse_sampling(body, chat=False)
    if echo and sampling.logprobs is not None:  # how likelihood is scored: each prompt token's logprob too
        sampling = dataclasses.replace(sampling, prompt_logprobs=sampling.logprobs)
    prompts, n = _parse_prompts(body.get("prompt")), _parse_n(body)
    if len(prompts) * n > MAX_BATCH_CHOICES:
        raise InvalidRequest(f"{len(prompts)} prompts x n={n} makes {len(prompts) * n} choices; at most "
                             f"{MAX_BATCH_CHOICES} in one request", "prompt")
    return CompletionRequest(
        model=_optional(body, "model", str),
        prompts=prompts,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        user=_optional(body, "user", str),
        n=n,
        echo=echo,
    )


def parse_sampling(body: dict[str, Any], *, chat: bool) -> SamplingParams:
    """The sampling fields of both endpoints. OpenAI defaults: temperature 1, no max_tokens."""
    best_of = _optional(body, "best_of", int)
    if best_of is not None and best_of != 1:
        raise InvalidRequest(f"best_of must be 1 (use n for several choices), got {best_of}", "best_of")
    # max_completion_tokens is the newer name; it wins when both are sent.
    max_tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(body, max_tokens_field, int)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"{max_tokens_field} must be at least 1, got {max_tokens}", max_tokens_field)
    temperature = _optional_number(body, "temperature")
    if temperature is not None and not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature:g}", "temperature")
    top_p = _optional_number(body, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p:g}", "top_p")
    top_k = _optional(body, "top_k", int)
    if top_k is not None and top_k < -1:
        raise InvalidRequest(f"top_k must be -1 or 0 (disabled) or positive, got {top_k}", "top_k")
    _reject_unsupported(body, chat)
    # OpenAI's penalties, and vLLM's repetition_penalty and min_tokens; SamplingParams checks their ranges.
    penalties = {name: value for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
                 if (value := _optional_number(body, name)) is not None}
    return SamplingParams(
        **penalties,  # type: ignore[arg-type]
        min_tokens=_optional(body, "min_tokens", int) or 0,
        logprobs=_parse_logprobs(body, chat),
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=max(top_k or 0, 0),  # vLLM spells "disabled" -1
        seed=_optional(body, "seed", int),
        stop=_parse_stop(body.get("stop")),
        stop_token_ids=_parse_token_ids(body.get("stop_token_ids"), "stop_token_ids", allow_empty=True),
        ignore_eos=bool(_optional(body, "ignore_eos", bool)),
    )


# Fields Tandem does not implement, with the values that ask for nothing (what clients send by
# default). Any other value is refused, naming the field, so a request never silently gets less
# than it asked for (a biased or JSON-constrained draw, a tool call, an echoed prompt).
_NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": (("",), "suffix (insertion) is not supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "tools": (([],), "tool calling is not supported"),
    "functions": (([],), "function calling is not supported"),
    "min_p": ((0, 0.0), "min_p is not supported"),
    "use_beam_search": ((False,), "beam search is not supported"),
    # vLLM's extra parameters, which its clients send in extra_body
    "length_penalty": ((1, 1.0), "length_penalty only shapes beam search, which is not supported"),
    "prompt_logprobs": ((), "vLLM's prompt_logprobs field is not supported; send echo: true with logprobs "
                            "to /v1/completions for the prompt's logprobs"),
    "guided_json": ((), "guided decoding (guided_json) is not supported"),
    "guided_regex": ((), "guided decoding (guided_regex) is not supported"),
    "guided_choice": ((), "guided decoding (guided_choice) is not supported"),
    "guided_grammar": ((), "guided decoding (guided_grammar) is not supported"),
    "structured_outputs": ((), "structured outputs are not supported"),
    "allowed_token_ids": ((), "allowed_token_ids is not supported"),
    "bad_words": (([],), "bad_words is not supported"),
    "truncate_prompt_tokens": ((), "truncate_prompt_tokens is not supported; shorten the prompt"),
    "include_stop_str_in_output": ((False,), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": ((True,), "special tokens are always skipped in the text"),
    "continue_final_message": ((False,), "continue_final_message is not supported"),
    "add_generation_prompt": ((True,), "the chat template always adds the generation prompt"),
    "chat_template": ((), "a request's own chat_template is not supported; the model's is used"),
}
# Chat requests also refuse these, which completions implement.
_NOT_IMPLEMENTED_IN_CHAT: dict[str, tuple[tuple[Any, ...], str]] = {
    "echo": ((False,), "echo is a completions field; chat completions do not echo the messages"),
    **_NOT_IMPLEMENTED,
}


def _parse_n(body: dict[str, Any]) -> int:
    n = _optional(body, "n", int)
    if n is not None and not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
    return n or 1


def _parse_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Alternatives per token (0: only the drawn token's), or None for no logprobs.

    Chat: ``logprobs`` true and ``top_logprobs`` in [0, 20]; completions: ``logprobs`` in [0, 20].
    """
    if chat:
        wanted = _optional(body, "logprobs", bool)
        top = _optional(body, "top_logprobs", int)
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}", "top_logprobs")
        if top and not wanted:
            raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if wanted else None
    count = _optional(body, "logprobs", int)
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {count}", "logprobs")
    return count


def _reject_unsupported(body: dict[str, Any], chat: bool) -> None:
    for name, (neutral, reason) in (_NOT_IMPLEMENTED_IN_CHAT if chat else _NOT_IMPLEMENTED).items():
        value = body.get(name)
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            raise InvalidRequest(f"{name}={_json_repr(value)}: {reason}; omit it or send null", name)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidRequest("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schema)",
                             "response_format")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and tool_choice != "none":
        raise InvalidRequest("tool_choice: tool calling is not supported; omit it or send \"none\"", "tool_choice")


def _json_repr(value: Any) -> str:
    """A short JSON rendering of a client's value, for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = bool(_optional(body, "stream", bool))
    options = _optional(body, "stream_options", dict)
    include_usage = False
    if options is not None:
        include_usage = bool(_optional(options, "include_usage", bool, field="stream_options.include_usage"))
    return stream, include_usage and stream


def _parse_prompts(prompt: Any) -> list[str | list[int]]:
    """A string, a list of token ids, or a batch: a list of strings or of token id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(item, str) for item in prompt):
            return [str(item) for item in prompt]
        if all(isinstance(item, list) for item in prompt):
            return [_parse_token_ids(item, "prompt", allow_empty=False) for item in prompt]
        return [_parse_token_ids(prompt, "prompt", allow_empty=False)]
    if prompt is None:
        raise InvalidRequest("prompt is required", "prompt")
    raise InvalidRequest("prompt must be a string, a list of token ids, or a list of either (a batch)", "prompt")


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(item, str) for item in stop):
        return list(stop)
    raise InvalidRequest("stop must be a string or a list of strings", "stop")


def _parse_token_ids(value: Any, field: str, *, allow_empty: bool) -> list[int]:
    if value is None and allow_empty:
        return []
    if not isinstance(value, list) or not all(_is_int(item) and item >= 0 for item in value):
        raise InvalidRequest(f"{field} must be a list of non-negative integer token ids", field)
    if not value and not allow_empty:
        raise InvalidRequest(f"{field} must not be empty", field)
    return list(value)


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


_TYPE_NAMES = {int: "an integer", bool: "a boolean", str: "a string", dict: "an object"}


def _optional(body: dict[str, Any], name: str, kind: type, *, field: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    matches = _is_int(value) if kind is int else isinstance(value, kind)
    if not matches:
        raise InvalidRequest(f"{field or name} must be {_TYPE_NAMES[kind]}, got {type(value).__name__}",
                             field or name)
    return value


def _optional_number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a number, got {value!r}", name)
    return float(value)
