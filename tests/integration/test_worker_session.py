"""The frontend's requests over one GenerateStream per worker, against scripted worker gRPC servers:
sharing, refusals, deadlines, cancels, a stream that breaks, and workers that lack the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import SamplingParams
from tandem.errors import InvalidRequest, Unavailable
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.test_frontend_pipeline import MODEL, FakeRouter, FakeTokenizer, FakeWorker, _start

pytestmark = pytest.mark.integration


@dataclass
class StreamWorker(worker_pb2_grpc.WorkerServiceServicer):
    """Serves GenerateStream only: a request gets tokens 10, 11, ... ("t0", "t1", ...; num_tokens, or its
    max_tokens if fewer), one a delay_s,
    each step's tokens for every running request in one message, as the real worker sends them."""

    num_tokens: int = 3
    delay_s: float = 0.01
    refuse: common_pb2.ErrorDetail | None = None  # refuse every request with this
    break_after_steps: int | None = None  # end the whole stream with UNAVAILABLE after this many steps
    hang: bool = False  # take requests, never answer
    num_streams: int = 0
    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    message_sizes: list[int] = field(default_factory=list)

    async def GenerateStream(self, request_iterator, context):  # noqa: N802
        self.num_streams += 1
        await context.send_initial_metadata(())  # as the real worker: the frontend writes after these
        running: dict[int, tuple[worker_pb2.GenerateRequest, int]] = {}  # stream id -> (request, tokens sent)
        arrived = asyncio.Event()

        async def read() -> None:
            async for message in request_iterator:
                for action in message.actions:
                    if action.HasField("start"):
                        self.started.append(action.start.request_id)
                        running[action.stream_id] = (action.start, 0)
                    elif action.stream_id in running:
                        self.cancelled.append(running.pop(action.stream_id)[0].request_id)
                arrived.set()

        reader = asyncio.create_task(read())
        try:
            steps = 0
            while True:
                await arrived.wait()
                await asyncio.sleep(self.delay_s)
                if self.hang:
                    continue
                outputs = []
                for stream_id, (request, sent) in list(running.items()):
                    if self.refuse is not None:
                        outputs.append(worker_pb2.StreamOutput(stream_id=stream_id, refusal=self.refuse))
                        del running[stream_id]
                        continue
                    response = worker_pb2.GenerateResponse(delta=common_pb2.TokenDelta(
                        token_ids=[10 + sent], text=f"t{sent}"))
                    if sent + 1 == min(self.num_tokens, request.sampling.max_tokens or self.num_tokens):
                        response.finish_reason = common_pb2.FINISH_REASON_LENGTH
                        del running[stream_id]
                    else:
                        running[stream_id] = (request, sent + 1)
                    outputs.append(worker_pb2.StreamOutput(stream_id=stream_id, response=response))
                if outputs:
                    self.message_sizes.append(len(outputs))
                    await context.write(worker_pb2.GenerateStreamResponse(outputs=outputs))
                steps += 1
                if self.break_after_steps is not None and steps >= self.break_after_steps:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: the worker went away")
                if not running:
                    arrived.clear()
        finally:
            reader.cancel()


@dataclass
class Mesh:
    router: FakeRouter
    pipeline: Pipeline
    servers: list[grpc.aio.Server]


async def _mesh(*workers: worker_pb2_grpc.WorkerServiceServicer, **pipeline_args: object) -> Mesh:
    servers, addresses = [], []
    for worker in workers:
        server, address = await _start(worker, worker_pb2_grpc.add_WorkerServiceServicer_to_server)
        servers.append(server)
        addresses.append(address)
    router = FakeRouter([(f"w{i}", address) for i, address in enumerate(addresses)])
    router_server, router_address = await _start(router, router_pb2_grpc.add_RouterServiceServicer_to_server)
    pipeline = Pipeline(model_name=MODEL, max_model_len=64, tokenizer=FakeTokenizer(), router_address=router_address,
                        metrics=FrontendMetrics(CollectorRegistry()), predict_routes=False,
                        **pipeline_args)  # type: ignore[arg-type]
    return Mesh(router, pipeline, [*servers, router_server])


@pytest.fixture
async def meshes() -> AsyncIterator[list[Mesh]]:
    built: list[Mesh] = []
    yield built
    for mesh in built:
        await mesh.pipeline.close()
        for server in mesh.servers:
            await server.stop(0)


def _request(request_id: str, max_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens), "completions", True)


async def _text(pipeline: Pipeline, request: GenerationRequest) -> str:
    async with aclosing(pipeline.generate(request)) as outputs:
        return "".join([output.text async for output in outputs])


async def test_concurrent_requests_share_one_stream_and_its_messages(meshes: list[Mesh]) -> None:
    worker = StreamWorker(num_tokens=4)
    meshes.append(mesh := await _mesh(worker))
    texts = await asyncio.gather(*(_text(mesh.pipeline, _request(f"r{i}", max_tokens=4)) for i in range(8)))
    assert texts == ["t0t1t2t3"] * 8
    assert worker.num_streams == 1 and sorted(worker.started) == sorted(f"r{i}" for i in range(8))
    assert max(worker.message_sizes) > 1  # one message carried several requests' tokens
    assert await _text(mesh.pipeline, _request("later", max_tokens=4)) == "t0t1t2t3" and worker.num_streams == 1


async def test_a_worker_without_the_stream_gets_a_call_per_request(meshes: list[Mesh]) -> None:
    worker = FakeWorker()  # serves Generate only
    meshes.append(mesh := await _mesh(worker))
    for i in range(3):
        assert await _text(mesh.pipeline, _request(f"r{i}")) == "t0t1t2"
    assert worker.request_ids == ["r0", "r1", "r2"]  # each ran once, the first after the stream was refused


async def test_a_refusal_is_the_error_the_call_would_have_given(meshes: list[Mesh]) -> None:
    worker = StreamWorker(refuse=common_pb2.ErrorDetail(
        code=common_pb2.ERROR_CODE_INVALID_ARGUMENT, field="sampling.max_tokens",
        message="sampling.max_tokens: 3 tokens do not fit"))
    meshes.append(mesh := await _mesh(worker))
    with pytest.raises(InvalidRequest) as raised:
        await _text(mesh.pipeline, _request("r0"))
    assert raised.value.field == "max_tokens" and "do not fit" in raised.value.message


async def test_the_request_deadline_holds_on_the_stream(meshes: list[Mesh]) -> None:
    worker = StreamWorker(hang=True)
    meshes.append(mesh := await _mesh(worker, request_timeout_s=0.3))
    with pytest.raises(Unavailable, match="did not finish within 0.3 s"):
        await _text(mesh.pipeline, _request("slow"))
    await asyncio.sleep(0.1)
    assert worker.cancelled == ["slow"]  # the worker was told to drop it


async def test_a_client_leaving_cancels_its_request_only(meshes: list[Mesh]) -> None:
    worker = StreamWorker(num_tokens=50)
    meshes.append(mesh := await _mesh(worker))
    other = asyncio.ensure_future(_text(mesh.pipeline, _request("stays", max_tokens=50)))
    async with aclosing(mesh.pipeline.generate(_request("leaves", max_tokens=50))) as outputs:
        await anext(outputs)
    assert await other == "".join(f"t{i}" for i in range(50))
    assert worker.cancelled == ["leaves"] and worker.num_streams == 1


async def test_a_broken_stream_moves_its_requests_to_another_worker(meshes: list[Mesh]) -> None:
    failing, healthy = StreamWorker(num_tokens=6, break_after_steps=2), StreamWorker(num_tokens=6)
    meshes.append(mesh := await _mesh(failing, healthy))
    texts = await asyncio.gather(*(_text(mesh.pipeline, _request(f"r{i}", max_tokens=6)) for i in range(3)))
    # Two tokens each from the first worker, the rest from the second, none lost or repeated.
    assert texts == ["t0t1t0t1t2t3"] * 3
    registry = mesh.pipeline.metrics.registry
    assert registry.get_sample_value("tandem_frontend_migrations_total",
                                     {"model": MODEL, "reason": "unreachable"}) == 3
