"""KServe v2 on the real frontend serve(), in front of a real router and decode worker (real
model) on port 0 in one process: tritonclient's greedy stream equals the OpenAI API's text."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.decode.server import serve as serve_decode
from services.frontend.server import FrontendConfig, RunningFrontend
from services.frontend.server import serve as serve_frontend
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"
T = TypeVar("T")


@dataclass
class Mesh:
    """Servers on a background event loop, so the tests can use blocking clients."""

    loop: asyncio.AbstractEventLoop
    router: RunningRouter
    worker: DecodeWorker
    frontend: RunningFrontend

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.frontend.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.frontend.http_port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)


@pytest.fixture(scope="module")
def mesh(model_path: Path) -> Iterator[Mesh]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kserve-mesh-loop", daemon=True)
    thread.start()

    async def start() -> tuple[RunningRouter, DecodeWorker, RunningFrontend]:
        router = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
        worker = await serve_decode(DecodeConfig(
            host="127.0.0.1", port=0, metrics_port=0, router_address=router.address, model=str(model_path),
            num_threads=1, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, drain_timeout_s=1,
        ))
        frontend = await serve_frontend(FrontendConfig(
            model=str(model_path), host="127.0.0.1", http_port=0, grpc_port=0, router_address=router.address,
            max_model_len=MAX_MODEL_LEN, shutdown_grace_s=1,
        ))
        return router, worker, frontend

    mesh = Mesh(loop, *asyncio.run_coroutine_threadsafe(start(), loop).result(120))
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    for _ in range(600):  # the worker registers with the router shortly after it starts
        if client.is_server_ready():
            break
        threading.Event().wait(0.05)
    client.close()
    yield mesh

    async def stop() -> None:
        await mesh.frontend.stop()
        await mesh.worker.stop(drain_timeout_s=1)
        await mesh.router.stop(grace_s=0)

    mesh.run(stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def vllm_inputs(prompt: str, *, stream: bool, sampling: str) -> list[grpcclient.InferInput]:
    tensors = []
    for name, value, datatype in (("text_input", prompt.encode(), "BYTES"), ("stream", stream, "BOOL"),
                                  ("sampling_parameters", sampling.encode(), "BYTES")):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        tensors.append(tensor)
    return tensors


def stream_text(url: str, model: str, requests: dict[str, list[grpcclient.InferInput]]) -> dict[str, list[str]]:
    """Send every request on one stream; the text deltas of each, by request id."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for request_id, tensors in requests.items():
        client.async_stream_infer(model, tensors, request_id=request_id, enable_empty_final_response=True)
    deltas: dict[str, list[str]] = {request_id: [] for request_id in requests}
    num_open = len(requests)
    while num_open:
        result, error = responses.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        deltas[response.id].append(result.as_numpy("text_output")[0].decode())
        num_open -= response.parameters["triton_final_response"].bool_param
    client.stop_stream()
    client.close()
    return deltas


def test_greedy_stream_equals_the_openai_api(mesh: Mesh) -> None:
    from openai import OpenAI

    model = mesh.frontend.model_name
    openai_client = OpenAI(base_url=f"http://{mesh.http_url}/v1", api_key="unused", max_retries=0)
    expected = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    sampling = '{"max_tokens": 16, "temperature": 0}'
    deltas = stream_text(mesh.grpc_url, model, {"a": vllm_inputs(PROMPT, stream=True, sampling=sampling)})["a"]
    assert len(deltas) > 1  # streamed, not one whole response
    assert "".join(deltas) == expected.choices[0].text


def test_concurrent_stream_requests_match_their_unary_answers(mesh: Mesh) -> None:
    model = mesh.frontend.model_name
    prompts = {"p0": "Once upon a time", "p1": "def fibonacci(n):", "p2": "The three primary colours are"}
    sampling = '{"max_tokens": 10, "temperature": 0}'
    streamed = stream_text(mesh.grpc_url, model,
                           {key: vllm_inputs(p, stream=True, sampling=sampling) for key, p in prompts.items()})
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    for key, prompt in prompts.items():
        whole = client.infer(model, vllm_inputs(prompt, stream=False, sampling=sampling))
        assert whole.as_numpy("text_output")[0].decode() == prompt + "".join(streamed[key])
    client.close()


def test_http_infer_and_generate_match_grpc(mesh: Mesh) -> None:
    model = mesh.frontend.model_name
    sampling = '{"max_tokens": 8, "temperature": 0}'
    grpc_client = grpcclient.InferenceServerClient(mesh.grpc_url)
    expected = grpc_client.infer(model, vllm_inputs(PROMPT, stream=False, sampling=sampling))
    grpc_client.close()
    http_client = httpclient.InferenceServerClient(mesh.http_url)
    tensor = httpclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([PROMPT.encode()], dtype=object))
    result = http_client.infer(model, [tensor], parameters={"max_tokens": 8, "temperature": 0})
    http_client.close()
    assert result.as_numpy("text_output").tolist() == expected.as_numpy("text_output").tolist()
    generated = httpx.post(f"http://{mesh.http_url}/v2/models/{model}/generate", timeout=60,
                           json={"text_input": PROMPT, "max_tokens": 8, "temperature": 0.0})
    assert generated.status_code == 200
    assert generated.json()["text_output"] == expected.as_numpy("text_output")[0].decode()


def test_metrics_label_the_kserve_endpoints(mesh: Mesh) -> None:
    metrics = httpx.get(f"http://{mesh.http_url}/metrics", timeout=10).text
    for endpoint in ("kserve_stream_infer", "kserve_infer", "kserve_generate"):
        assert f'endpoint="{endpoint}"' in metrics


def test_reflection_lists_the_kserve_service(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = [service.name for service in response.list_services_response.service]
    assert "inference.GRPCInferenceService" in names


def test_server_and_model_ready_with_a_worker(mesh: Mesh) -> None:
    client = grpcclient.InferenceServerClient(mesh.grpc_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(mesh.frontend.model_name)
    assert client.get_model_config(mesh.frontend.model_name).config.parameters["max_model_len"].string_value == \
        str(MAX_MODEL_LEN)
    client.close()


def test_reflection_describes_every_frontend_service(mesh: Mesh) -> None:
    """grpcurl's `describe`: the file holding each service resolves, KServe's own pool included."""
    from google.protobuf import descriptor_pb2

    symbols = ["inference.GRPCInferenceService", "tandem.api.v1.GenerationService", "grpc.health.v1.Health"]
    with grpc.insecure_channel(mesh.grpc_url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
        responses = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    for symbol, response in zip(symbols, responses, strict=True):
        assert response.HasField("file_descriptor_response"), (symbol, response.error_response)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in response.file_descriptor_response.file_descriptor_proto]
        services = {f"{f.package}.{s.name}" for f in files for s in f.service}
        assert symbol in services
