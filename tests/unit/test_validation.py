"""OpenAI request bodies: every bad input is an InvalidRequest naming the field; good ones map to SamplingParams."""

from __future__ import annotations

from typing import Any

import pytest

from services.frontend.messages import normalise_messages
from services.frontend.openai_protocol import parse_chat_request, parse_completion_request
from tandem.errors import InvalidRequest

pytestmark = pytest.mark.unit

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hello", **fields}


CHAT_CASES = [
    (chat(messages=[]), "messages"),
    ({"model": "m"}, "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=[{"content": "hi"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[USER[0], "hi"]), "messages[1]"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "messages[0].content"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-5), "max_tokens"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_tokens="10"), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(temperature=-0.1), "temperature"),
    (chat(temperature=2.5), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_k=-2), "top_k"),
    (chat(n=0), "n"),
    (chat(n=17), "n"),
    (chat(n="1"), "n"),
    (chat(best_of=3), "best_of"),
    (chat(seed=-1), "seed"),
    (chat(seed="7"), "seed"),
    (chat(stop=5), "stop"),
    (chat(stop=["ok", 3]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(stop_token_ids=[1, -2]), "stop_token_ids"),
    (chat(stop_token_ids="1"), "stop_token_ids"),
    (chat(ignore_eos="yes"), "ignore_eos"),
    (chat(stream="true"), "stream"),
    (chat(stream=True, stream_options=[]), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage"),
    (chat(model=7), "model"),
    (chat(user=1), "user"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(frequency_penalty="0.5"), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(min_tokens=-1), "min_tokens"),
    (chat(min_tokens=9, max_tokens=4), "min_tokens"),
    (chat(logprobs=1), "logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
]
COMPLETION_CASES = [
    (completion(prompt=None), "prompt"),
    ({"model": "m"}, "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=["a", 1]), "prompt"),
    (completion(prompt=[[1, 2], []]), "prompt"),
    (completion(prompt=["a"] * 9, n=8), "prompt"),  # 72 choices: more than one request may ask for
    (completion(prompt=[1, "a"]), "prompt"),
    (completion(prompt=[1, -1]), "prompt"),
    (completion(prompt=42), "prompt"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(logprobs=True), "logprobs"),
    (completion(logprobs=-1), "logprobs"),
    (completion(n=-1), "n"),
    (completion(temperature=3), "temperature"),
]


@pytest.mark.parametrize(("parse", "body", "field"), [
    *[(parse_chat_request, body, field) for body, field in CHAT_CASES],
    *[(parse_completion_request, body, field) for body, field in COMPLETION_CASES],
])
def test_bad_input_names_the_field(parse: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.field == field, info.value.message
    assert info.value.message


@pytest.mark.parametrize("body", [None, [], "text", 3])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        parse_chat_request(body)
    with pytest.raises(InvalidRequest):
        parse_completion_request(body)


def test_openai_defaults() -> None:
    request = parse_chat_request({"messages": USER})
    assert request.model is None and not request.stream and not request.include_usage
    sampling = request.sampling
    assert sampling.max_tokens is None  # until the context is full
    assert sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.top_k == 0
    assert sampling.seed is None and sampling.stop == [] and not sampling.ignore_eos


def test_sampling_fields_are_carried() -> None:
    request = parse_chat_request(chat(
        max_tokens=7, temperature=0, top_p=0.5, top_k=40, seed=3, stop="\n", ignore_eos=True,
        stop_token_ids=[2], n=1, user="u1", stream=True, stream_options={"include_usage": True},
    ))
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (7, 0, 0.5, 40, 3)
    assert sampling.stop == ["\n"] and sampling.stop_token_ids == [2] and sampling.ignore_eos
    assert request.stream and request.include_usage and request.user == "u1"


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=9)).sampling.max_tokens == 9
    assert parse_chat_request(chat(max_tokens=5, max_completion_tokens=None)).sampling.max_tokens == 5


def test_top_k_minus_one_disables() -> None:
    assert parse_chat_request(chat(top_k=-1)).sampling.top_k == 0


def test_include_usage_needs_stream() -> None:
    assert not parse_chat_request(chat(stream_options={"include_usage": True})).include_usage


def test_fields_clients_send_at_their_defaults_are_accepted() -> None:
    request = parse_chat_request(chat(
        logprobs=False, top_logprobs=0, logit_bias={}, response_format={"type": "text"}, tools=[],
        tool_choice="none", parallel_tool_calls=False, service_tier="auto", store=False, metadata={},
        temperature=0.0, frequency_penalty=0, presence_penalty=0.0, skip_special_tokens=True,
        include_stop_str_in_output=False, add_generation_prompt=True, guided_json=None, length_penalty=1,
    ))
    assert request.sampling.temperature == 0.0 and not request.sampling.penalised
    assert not parse_completion_request(completion(logprobs=None, echo=False, suffix="")).sampling.penalised


def test_penalties_and_min_tokens_are_applied_not_dropped() -> None:
    sampling = parse_chat_request(chat(frequency_penalty=0.5, presence_penalty=-1, repetition_penalty=1.3,
                                       min_tokens=3, max_tokens=5)).sampling
    assert (sampling.frequency_penalty, sampling.presence_penalty, sampling.repetition_penalty,
            sampling.min_tokens) == (0.5, -1.0, 1.3, 3)


@pytest.mark.parametrize(("body", "field"), [
    (chat(echo=True), "echo"),
    (completion(suffix="end"), "suffix"),
    (chat(logit_bias={"1": 2}), "logit_bias"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(tool_choice="auto"), "tool_choice"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(min_p=0.1), "min_p"),
    (chat(guided_json={"type": "object"}), "guided_json"),
    (chat(guided_choice=["a", "b"]), "guided_choice"),
    (completion(prompt_logprobs=1), "prompt_logprobs"),
    (completion(include_stop_str_in_output=True), "include_stop_str_in_output"),
    (chat(skip_special_tokens=False), "skip_special_tokens"),
    (chat(allowed_token_ids=[1, 2]), "allowed_token_ids"),
])
def test_features_not_implemented_are_refused_by_name(body: dict, field: str) -> None:
    parse = parse_chat_request if "messages" in body else parse_completion_request
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.field == field and field in info.value.message


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", "hello"),
    (["hello"], "hello"),
    ([1, 2, 3], [1, 2, 3]),
    ([[4, 5]], [4, 5]),
])
def test_completion_prompt_shapes(prompt: Any, expected: Any) -> None:
    parsed = parse_completion_request(completion(prompt=prompt))
    assert parsed.prompt == expected and parsed.prompts == [expected]


def test_a_completion_batch_is_a_list_of_prompts() -> None:
    assert parse_completion_request(completion(prompt=["a", "b"])).prompts == ["a", "b"]
    batch = parse_completion_request(completion(prompt=[[1, 2], [3]], n=2))
    assert batch.prompts == [[1, 2], [3]] and batch.prompt == [1, 2] and batch.n == 2
    assert len(parse_completion_request(completion(prompt=["a"] * 8, n=8)).prompts) == 8  # 64 choices: the most


def test_messages_are_flattened_for_the_template() -> None:
    messages = normalise_messages([
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
    ])
    assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


def test_logprobs_in_chat_and_completions_spelling() -> None:
    assert parse_chat_request(chat(logprobs=True, top_logprobs=3)).sampling.logprobs == 3
    assert parse_chat_request(chat(logprobs=True)).sampling.logprobs == 0
    assert parse_chat_request(chat(logprobs=False, top_logprobs=0)).sampling.logprobs is None
    assert parse_completion_request(completion(logprobs=2)).sampling.logprobs == 2
    assert parse_completion_request(completion(logprobs=0)).sampling.logprobs == 0
    assert parse_completion_request(completion()).sampling.logprobs is None


def test_echo_with_logprobs_asks_for_the_prompts_logprobs_too() -> None:
    scored = parse_completion_request(completion(echo=True, logprobs=1, max_tokens=1))
    assert scored.echo and scored.sampling.prompt_logprobs == 1 == scored.sampling.logprobs
    echoed = parse_completion_request(completion(echo=True))
    assert echoed.echo and echoed.sampling.prompt_logprobs is None  # text only: nothing to score
    assert parse_completion_request(completion(logprobs=1)).sampling.prompt_logprobs is None
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(completion(echo="yes"))
    assert info.value.field == "echo"


def test_n_choices() -> None:
    assert parse_chat_request(chat(n=3)).n == 3
    assert parse_completion_request(completion()).n == 1
