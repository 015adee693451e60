"""The v2 HTTP endpoints through the real tritonclient.http (sync and asyncio) and Triton's
generate extension through plain HTTP, on a real aiohttp server over a scripted pipeline."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio
from aiohttp import web
from tritonclient.utils import InferenceServerException

from services.frontend.kserve.http import add_kserve_routes
from tests.integration.test_kserve_grpc import MODEL, ScriptedPipeline, expected_text, in_thread, pipeline

pytestmark = pytest.mark.integration
__all__ = ["pipeline"]  # the fixture, shared with the gRPC tests


@pytest.fixture
async def http_url(pipeline: ScriptedPipeline) -> AsyncIterator[str]:
    app = web.Application()
    add_kserve_routes(app, pipeline)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


def http_inputs(prompt: str | None = "Hi", *, sampling: str | None = None,
                binary: bool = True) -> list[httpclient.InferInput]:
    tensors = []
    for name, value in (("text_input", prompt), ("sampling_parameters", sampling)):
        if value is not None:
            tensor = httpclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=object), binary_data=binary)
            tensors.append(tensor)
    return tensors


async def test_tritonclient_http_sync(http_url: str) -> None:
    def calls() -> None:
        client = httpclient.InferenceServerClient(http_url)
        try:
            check(client)
        finally:
            client.close()

    def check(client: httpclient.InferenceServerClient) -> None:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert not client.is_model_ready("nope")
        assert client.get_server_metadata()["name"] == "tandem"
        assert client.get_model_metadata(MODEL)["inputs"][0] == {"name": "text_input", "datatype": "BYTES",
                                                                 "shape": [1]}
        config = client.get_model_config(MODEL)
        assert config["model_transaction_policy"] == {"decoupled": True} and config["max_batch_size"] == 0
        assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
        # Binary inputs and outputs, as tritonclient sends and asks for them by default.
        result = client.infer(MODEL, http_inputs("Hi", sampling='{"max_tokens": 3}'), request_id="h1")
        assert result.as_numpy("text_output").tolist() == [("Hi" + expected_text(3)).encode()]
        assert result.as_numpy("finish_reason").tolist() == [b"length"]
        assert result.get_response()["id"] == "h1"
        # JSON inputs and an output asked for as JSON.
        result = client.infer(MODEL, http_inputs("Yo", binary=False),
                              outputs=[httpclient.InferRequestedOutput("text_output", binary_data=False)])
        assert result.get_response()["outputs"] == [
            {"name": "text_output", "datatype": "BYTES", "shape": [1], "data": ["Yo" + expected_text(16)]}]
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("nope")
        assert info.value.status() == "404"

    await in_thread(calls)


@pytest.mark.parametrize(("model", "tensors", "status", "needle"), [
    (MODEL, http_inputs(None, sampling="{}"), "400", "text_input"),
    (MODEL, http_inputs("Hi", sampling="[1"), "400", "sampling_parameters"),
    ("nope", http_inputs("Hi"), "404", "nope"),
    (MODEL, http_inputs("fail"), "503", "no healthy worker"),
])
async def test_tritonclient_http_aio_errors(http_url: str, model: str, tensors: list[httpclient.InferInput],
                                            status: str, needle: str) -> None:
    async with httpclient_aio.InferenceServerClient(http_url) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer(model, tensors)
    assert info.value.status() == status and needle in info.value.message()


async def test_tritonclient_http_aio_infer(http_url: str) -> None:
    async with httpclient_aio.InferenceServerClient(http_url) as client:
        assert await client.is_server_ready()
        result = await client.infer(MODEL, http_inputs("Hi"), parameters={"max_tokens": 2})
    assert result.as_numpy("text_output").tolist() == [("Hi" + expected_text(2)).encode()]


async def test_generate_extension(http_url: str, pipeline: ScriptedPipeline) -> None:
    base = f"http://{http_url}/v2/models/{MODEL}"
    async with aiohttp.ClientSession() as session:
        body: dict[str, Any] = {"id": "g1", "text_input": "Hi", "parameters": {"max_tokens": 2, "temperature": 0}}
        async with session.post(f"{base}/generate", json=body) as response:
            assert response.status == 200
            assert await response.json() == {"model_name": MODEL, "model_version": "1", "id": "g1",
                                              "text_output": "Hi" + expected_text(2), "finish_reason": "length"}
        # TensorRT-LLM style: sampling settings as top-level inputs.
        body = {"text_input": "Hi", "max_tokens": 3, "stop_words": [""], "stream": True}
        async with session.post(f"{base}/generate_stream", json=body) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            events = [json.loads(line[len(b"data: "):]) async for line in response.content
                      if line.startswith(b"data: ")]
        assert [e["text_output"] for e in events] == ["<0>", "<1>", "<2>"]
        assert events[-1]["finish_reason"] == "length" and "finish_reason" not in events[0]
        assert [r.endpoint for r in pipeline.requests] == ["kserve_generate", "kserve_generate_stream"]
        assert pipeline.requests[0].sampling.temperature == 0.0


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("generate", {"text_input": "Hi", "stream": True}, 400, "stream"),
    ("generate", {"sampling_parameters": "{}"}, 400, "text_input"),
    ("generate", {"text_input": "Hi", "sampling_parameters": "{bad"}, 400, "sampling_parameters"),
    ("generate", {"text_input": 5}, 400, "text_input"),
    ("generate_stream", {"text_input": "Hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("generate_stream", {"text_input": "fail", "stream": True}, 503, "no healthy worker"),
    ("generate", "not an object", 400, "JSON object"),
])
async def test_generate_errors(http_url: str, path: str, body: Any, status: int, needle: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://{http_url}/v2/models/{MODEL}/{path}", json=body) as response:
            assert response.status == status
            assert needle in (await response.json())["error"]
        async with session.post(f"http://{http_url}/v2/models/nope/generate", json={"text_input": "Hi"}) as response:
            assert response.status == 404


async def test_health_follows_the_workers(http_url: str, pipeline: ScriptedPipeline) -> None:
    async with aiohttp.ClientSession() as session:
        pipeline.healthy = False
        for path, status in (("/v2/health/live", 200), ("/v2/health/ready", 400),
                             (f"/v2/models/{MODEL}/ready", 400), (f"/v2/models/{MODEL}/versions/1", 200),
                             (f"/v2/models/{MODEL}/versions/2", 404), ("/v2", 200)):
            async with session.get(f"http://{http_url}{path}") as response:
                assert response.status == status, path
