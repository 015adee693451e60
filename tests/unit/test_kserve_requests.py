"""KServe inputs -> a generation request, with the vLLM and TensorRT-LLM backends' semantics."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as triton_config

from services.frontend.kserve.codec import Tensor
from services.frontend.kserve.model import INPUTS, model_config
from services.frontend.kserve.requests import build_outputs, parse_request
from tandem.engine.types import FinishReason
from tandem.errors import InvalidRequest
from tandem.proto.kserve import model_config_pb2

pytestmark = pytest.mark.unit


def text(value: str = "Hello", shape: list[int] | None = None) -> Tensor:
    return Tensor("text_input", "BYTES", shape or [1], [value.encode()])


def flag(name: str, value: bool) -> Tensor:
    return Tensor(name, "BOOL", [1], [value])


def parse(*tensors: Tensor, parameters: dict[str, Any] | None = None, outputs: list[str] | None = None):
    return parse_request({t.name: t for t in tensors}, parameters or {}, outputs or [], "m")


def sampling_json(value: str) -> Tensor:
    return Tensor("sampling_parameters", "BYTES", [1], [value.encode()])


def test_defaults_follow_the_vllm_backend() -> None:
    request = parse(text())
    assert request.prompt == "Hello"
    assert request.sampling.max_tokens == 16 and request.sampling.temperature == 1.0
    assert (request.stream, request.prepend_input) == (False, True)  # whole text includes the prompt
    assert request.output_names == ("text_output", "finish_reason")


def test_streaming_excludes_the_prompt_and_cannot_include_it() -> None:
    assert parse(text(), flag("stream", True)).prepend_input is False
    assert parse(text(), flag("exclude_input_in_output", True)).prepend_input is False
    with pytest.raises(InvalidRequest) as info:
        parse(text(), flag("stream", True), flag("exclude_input_in_output", False))
    assert info.value.field == "exclude_input_in_output"


def test_stream_from_request_parameters_when_no_input() -> None:
    assert parse(text(), parameters={"stream": True}).stream is True
    assert parse(text(), flag("stream", False), parameters={"stream": True}).stream is False


def test_missing_text_input_is_named() -> None:
    with pytest.raises(InvalidRequest, match="text_input") as info:
        parse(flag("stream", True))
    assert info.value.field == "text_input"


@pytest.mark.parametrize("tensor", [
    Tensor("text_input", "INT32", [1], [5]),
    Tensor("stream", "BYTES", [1], [b"true"]),
    Tensor("max_tokens", "FP32", [1], [5.0]),
    Tensor("sampling_parameters", "BOOL", [1], [True]),
])
def test_wrong_datatype(tensor: Tensor) -> None:
    tensors = [tensor] if tensor.name == "text_input" else [text(), tensor]
    with pytest.raises(InvalidRequest, match="datatype") as info:
        parse(*tensors)
    assert info.value.field == tensor.name


@pytest.mark.parametrize("shape", [[2], [2, 1], [1, 1, 1], []])
def test_wrong_shape(shape: list[int]) -> None:
    tensor = Tensor("text_input", "BYTES", shape, [b"a"] * max(1, len(shape) and shape[0]))
    with pytest.raises(InvalidRequest, match="shape") as info:
        parse(tensor)
    assert info.value.field == "text_input"


def test_batch_dimension_of_one_is_accepted() -> None:
    request = parse(text(shape=[1, 1]), Tensor("max_tokens", "INT32", [1, 1], [3]))
    assert request.sampling.max_tokens == 3


def test_unknown_input_is_rejected() -> None:
    with pytest.raises(InvalidRequest, match="unexpected inference input 'prompt'"):
        parse(text(), Tensor("prompt", "BYTES", [1], [b"x"]))


def test_sampling_parameters_as_vllm_clients_send_them() -> None:
    request = parse(text(), sampling_json(
        '{"temperature": "0.1", "top_p": "0.95", "max_tokens": "100", "top_k": -1, "stop": "\\n",'
        ' "seed": 3, "ignore_eos": "true", "n": "1", "presence_penalty": 0, "logprobs": null}'))
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.top_k) == (0.1, 0.95, 100, 0)
    assert (sampling.stop, sampling.seed, sampling.ignore_eos) == (["\n"], 3, True)


@pytest.mark.parametrize(("body", "field"), [
    ("{not json", "sampling_parameters"),
    ("[1, 2]", "sampling_parameters"),
    ('{"max_token": 5}', "sampling_parameters.max_token"),
    ('{"n": 2}', "sampling_parameters.n"),
    ('{"max_tokens": "many"}', "sampling_parameters.max_tokens"),
    ('{"temperature": -1}', "temperature"),
    ('{"max_tokens": 0}', "max_tokens"),
])
def test_bad_sampling_parameters(body: str, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(text(), sampling_json(body))
    assert info.value.field == field


def test_request_parameters_feed_sampling_and_ignore_foreign_keys() -> None:
    request = parse(text(), parameters={"max_tokens": 4, "temperature": 0, "priority": 2,
                                        "triton_enable_empty_final_response": True})
    assert (request.sampling.max_tokens, request.sampling.temperature) == (4, 0.0)
    request = parse(text(), sampling_json('{"max_tokens": 9}'), parameters={"max_tokens": 4})
    assert request.sampling.max_tokens == 9  # the tensor wins over the parameters


def test_tensorrt_llm_inputs() -> None:
    request = parse(
        text(shape=[1, 1]), Tensor("max_tokens", "INT32", [1, 1], [20]),
        Tensor("temperature", "FP32", [1, 1], [0.0]), Tensor("top_k", "INT32", [1, 1], [1]),
        Tensor("top_p", "FP32", [1, 1], [0.9]), Tensor("random_seed", "UINT64", [1, 1], [42]),
        Tensor("stop_words", "BYTES", [1, 2], [b"", b"END"]), Tensor("bad_words", "BYTES", [1, 1], [b""]),
        Tensor("end_id", "INT32", [1, 1], [2]), Tensor("pad_id", "INT32", [1, 1], [2]),
        Tensor("beam_width", "INT32", [1, 1], [1]), Tensor("length_penalty", "FP32", [1, 1], [1.3]),
    )
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_k, sampling.top_p) == (20, 0.0, 1, 0.9)
    assert (sampling.seed, sampling.stop, sampling.stop_token_ids) == (42, ["END"], [2])


@pytest.mark.parametrize("tensor", [
    Tensor("beam_width", "INT32", [1], [4]),
    Tensor("bad_words", "BYTES", [1], [b"darn"]),
    Tensor("return_log_probs", "BOOL", [1], [True]),
])
def test_unsupported_tensorrt_llm_settings_are_named(tensor: Tensor) -> None:
    with pytest.raises(InvalidRequest, match="not supported") as info:
        parse(text(), tensor)
    assert info.value.field == tensor.name


def test_requested_outputs() -> None:
    assert parse(text(), outputs=["text_output"]).output_names == ("text_output",)
    assert parse(text(), flag("return_num_output_tokens", True)).output_names == (
        "text_output", "finish_reason", "num_output_tokens")
    with pytest.raises(InvalidRequest, match="unexpected inference output 'logits'"):
        parse(text(), outputs=["logits"])


def test_build_outputs_reports_finish_reason_once_known() -> None:
    request = parse(text(), flag("return_num_input_tokens", True))
    partial = build_outputs(request, "ab", None, 5, 1)
    assert [t.name for t in partial] == ["text_output", "num_input_tokens"]
    final = build_outputs(request, "c", FinishReason.LENGTH, 5, 1)
    assert [(t.name, t.values) for t in final] == [
        ("text_output", [b"c"]), ("finish_reason", [b"length"]), ("num_input_tokens", [5])]


def test_model_config_is_a_valid_decoupled_triton_config() -> None:
    config = model_config("m", 2048)
    ours = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    theirs = triton_config.ModelConfig.FromString(ours.SerializeToString())
    assert theirs.model_transaction_policy.decoupled is True
    assert [i.name for i in theirs.input] == [spec.name for spec in INPUTS]
    assert theirs.input[0].data_type == triton_config.TYPE_STRING and not theirs.input[0].optional
    assert theirs.output[0].name == "text_output"


def test_penalties_and_min_tokens_reach_the_sampling() -> None:
    request = parse(text(), Tensor("repetition_penalty", "FP32", [1], [1.2]),
                    Tensor("frequency_penalty", "FP32", [1], [0.5]),
                    Tensor("sampling_parameters", "BYTES", [1],
                           [b'{"presence_penalty": "-1", "min_tokens": 4, "max_tokens": 8}']))
    sampling = request.sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.min_tokens) == (-1.0, 0.5, 4)
    assert sampling.repetition_penalty == pytest.approx(1.2)
    with pytest.raises(InvalidRequest, match="repetition_penalty") as info:
        parse(text(), Tensor("repetition_penalty", "FP32", [1], [0.0]))
    assert info.value.field == "repetition_penalty"
