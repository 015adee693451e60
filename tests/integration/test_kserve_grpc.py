"""inference.GRPCInferenceService through the real tritonclient.grpc (sync and asyncio), on a
real gRPC server over a scripted pipeline: health, metadata, infer, streaming, errors."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from services.frontend.kserve.grpc_service import add_kserve_to_grpc_server
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import FinishReason, RequestOutput
from tandem.errors import Unavailable

pytestmark = pytest.mark.integration

MODEL = "scripted"
T = TypeVar("T")


class ByteTokenizer:
    """One token per UTF-8 byte: enough for the pipeline's checks."""

    def __len__(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class ScriptedPipeline(Pipeline):
    """The real Pipeline's checks and metrics; generate() answers "<0><1>..." up to max_tokens
    (4 when unset), one token per delta; a prompt starting with "fail" finds no worker."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL, max_model_len=128, tokenizer=ByteTokenizer(),
                         router_address="127.0.0.1:9")
        self.requests: list[GenerationRequest] = []
        self.healthy = True
        self.delay_s = 0.01

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        self.requests.append(request)
        if bytes(request.prompt_token_ids).startswith(b"fail"):
            raise Unavailable(f"no healthy worker for model '{MODEL}'")
        num_tokens = request.sampling.max_tokens or 4
        for i in range(num_tokens):
            await asyncio.sleep(self.delay_s)
            last = i == num_tokens - 1
            yield RequestOutput(request.request_id, [i], f"<{i}>", FinishReason.LENGTH if last else None,
                                num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=i + 1)

    async def num_healthy_workers(self) -> int:
        return 1 if self.healthy else 0


def expected_text(num_tokens: int) -> str:
    return "".join(f"<{i}>" for i in range(num_tokens))


@pytest.fixture
async def pipeline() -> AsyncIterator[ScriptedPipeline]:
    scripted = ScriptedPipeline()
    yield scripted
    await scripted.close()


@pytest.fixture
async def grpc_url(pipeline: ScriptedPipeline) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add_kserve_to_grpc_server(server, pipeline)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def inputs(prompt: str | None = "Hi", *, stream: bool | None = None, sampling: str | None = None,
           exclude_input: bool | None = None) -> list[grpcclient.InferInput]:
    tensors = []

    def add(name: str, value: Any, datatype: str) -> None:
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        tensors.append(tensor)

    if prompt is not None:
        add("text_input", prompt.encode(), "BYTES")
    if stream is not None:
        add("stream", stream, "BOOL")
    if sampling is not None:
        add("sampling_parameters", sampling.encode(), "BYTES")
    if exclude_input is not None:
        add("exclude_input_in_output", exclude_input, "BOOL")
    return tensors


async def in_thread(function: Callable[[], T]) -> T:
    """Sync tritonclient blocks: run it off the loop that serves it."""
    return await asyncio.to_thread(function)


def text_of(result: grpcclient.InferResult) -> str:
    return "".join(v.decode() for v in result.as_numpy("text_output").tolist())


async def test_health_metadata_config_and_unimplemented(grpc_url: str, pipeline: ScriptedPipeline) -> None:
    def calls() -> None:
        client = grpcclient.InferenceServerClient(grpc_url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "2")
        assert "generate" in client.get_server_metadata().extensions
        metadata = client.get_model_metadata(MODEL)
        assert metadata.versions == ["1"]
        assert ("text_input", "BYTES") in [(t.name, t.datatype) for t in metadata.inputs]
        config = client.get_model_config(MODEL).config
        assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
        assert {o.name for o in config.output} >= {"text_output", "finish_reason"}
        index = client.get_model_repository_index()
        assert [(m.name, m.state) for m in index.models] == [(MODEL, "READY")]
        for call in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_config("nope")):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.NOT_FOUND"
        for call in (lambda: client.get_inference_statistics(MODEL), lambda: client.load_model(MODEL)):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
        pipeline.healthy = False
        assert not client.is_server_ready() and not client.is_model_ready(MODEL)
        client.close()

    await in_thread(calls)


async def test_infer_returns_the_whole_completion(grpc_url: str, pipeline: ScriptedPipeline) -> None:
    def calls() -> tuple[grpcclient.InferResult, grpcclient.InferResult]:
        client = grpcclient.InferenceServerClient(grpc_url)
        with_prompt = client.infer(MODEL, inputs("Hi", sampling='{"max_tokens": 3}'), request_id="r1")
        without = client.infer(MODEL, inputs("Hi", exclude_input=True), parameters={"max_tokens": 2})
        client.close()
        return with_prompt, without

    with_prompt, without = await in_thread(calls)
    assert text_of(with_prompt) == "Hi" + expected_text(3)  # the vLLM backend's default: prompt included
    assert with_prompt.as_numpy("finish_reason").tolist() == [b"length"]
    assert with_prompt.get_response().id == "r1" and with_prompt.get_response().model_version == "1"
    assert text_of(without) == expected_text(2)
    assert [r.endpoint for r in pipeline.requests] == ["kserve_infer", "kserve_infer"]


async def test_stream_infer_marks_the_final_response(grpc_url: str) -> None:
    def calls() -> list[tuple[Any, Any]]:
        responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = grpcclient.InferenceServerClient(grpc_url)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(MODEL, inputs("Hi", stream=True, sampling='{"max_tokens": 3}'),
                                  request_id="s1", enable_empty_final_response=True)
        got = [responses.get(timeout=10) for _ in range(3)]
        client.stop_stream()
        client.close()
        return got

    got = await in_thread(calls)
    assert all(error is None for _, error in got)
    responses = [result.get_response() for result, _ in got]
    assert [text_of(result) for result, _ in got] == ["<0>", "<1>", "<2>"]  # one per delta, no prompt
    assert [r.parameters["triton_final_response"].bool_param for r in responses] == [False, False, True]
    assert [result.as_numpy("finish_reason") is None for result, _ in got] == [True, True, False]
    assert {r.id for r in responses} == {"s1"}


async def test_stream_without_stream_input_answers_once(grpc_url: str) -> None:
    async with grpcclient_aio.InferenceServerClient(grpc_url) as client:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL, "inputs": inputs("Hi", sampling='{"max_tokens": 2}')}

        got = [item async for item in client.stream_infer(requests())]
    assert len(got) == 1 and got[0][1] is None
    assert text_of(got[0][0]) == "Hi" + expected_text(2)


async def test_concurrent_requests_and_a_bad_one_share_a_stream(grpc_url: str) -> None:
    """Requests run side by side; the bad ones answer with error_message and the rest finish."""
    bad = {"missing": inputs(None, stream=True), "json": inputs("Hi", stream=True, sampling="{oops"),
           "model": inputs("Hi", stream=True), "worker": inputs("fail now", stream=True)}

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for n in range(1, 5):
            yield {"model_name": MODEL, "inputs": inputs("Hi", stream=True, sampling=f'{{"max_tokens": {n}}}'),
                   "request_id": f"ok{n}", "parameters": {"triton_enable_empty_final_response": True}}
            if n == 2:
                for name, tensors in bad.items():
                    yield {"model_name": "nope" if name == "model" else MODEL, "inputs": tensors,
                           "request_id": name}

    texts: dict[str, str] = {}
    order: list[str] = []
    errors: list[str] = []
    async with grpcclient_aio.InferenceServerClient(grpc_url) as client:
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                errors.append(error.message())
                continue
            request_id = result.get_response().id
            order.append(request_id)
            texts[request_id] = texts.get(request_id, "") + text_of(result)
    assert texts == {f"ok{n}": expected_text(n) for n in range(1, 5)}
    assert len(errors) == 4
    assert any("text_input" in e for e in errors) and any("sampling_parameters" in e for e in errors)
    assert any("nope" in e for e in errors) and any("no healthy worker" in e for e in errors)
    assert order != sorted(order)  # the requests' responses interleaved: they ran concurrently


@pytest.mark.parametrize(("tensors", "status", "needle"), [
    (inputs(None, stream=False), "INVALID_ARGUMENT", "text_input"),
    (inputs("Hi", sampling="{not json"), "INVALID_ARGUMENT", "sampling_parameters"),
    (inputs("Hi", sampling='{"temperature": -1}'), "INVALID_ARGUMENT", "temperature"),
    (inputs("Hi", stream=True), "INVALID_ARGUMENT", "stream"),
    (inputs("fail"), "UNAVAILABLE", "no healthy worker"),
])
async def test_infer_errors(grpc_url: str, tensors: list[grpcclient.InferInput], status: str, needle: str) -> None:
    async with grpcclient_aio.InferenceServerClient(grpc_url) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer(MODEL, tensors)
    assert info.value.status() == f"StatusCode.{status}" and needle in info.value.message()


async def test_wrong_datatype_shape_and_model(grpc_url: str) -> None:
    as_int = grpcclient.InferInput("text_input", [1], "INT32")
    as_int.set_data_from_numpy(np.array([1], dtype=np.int32))
    two = grpcclient.InferInput("text_input", [2], "BYTES")
    two.set_data_from_numpy(np.array([b"a", b"b"], dtype=object))
    async with grpcclient_aio.InferenceServerClient(grpc_url) as client:
        for tensors, needle in (([as_int], "datatype"), ([two], "shape")):
            with pytest.raises(InferenceServerException) as info:
                await client.infer(MODEL, tensors)
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and needle in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            await client.infer("nope", inputs("Hi"))
        assert info.value.status() == "StatusCode.NOT_FOUND"
