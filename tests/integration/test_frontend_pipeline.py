"""The frontend pipeline against scripted router and worker gRPC servers: routing, re-routing, errors, cancel."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import FinishReason, SamplingParams
from tandem.errors import InvalidRequest, ResourceExhausted, Unavailable
from tandem.grpc_server import request_id_from_context
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

MODEL = "test-model"


class FakeTokenizer:
    """Token 10 + i reads "t<i>", as FakeWorker emits it; prompt tokens (< 10) read as nothing."""

    def __len__(self) -> int:
        return 1000

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"t{token_id - 10}" for token_id in token_ids if token_id >= 10)


@dataclass
class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    workers: list[tuple[str, str]]  # (worker_id, address), tried in order
    requests: list[router_pb2.RouteRequest] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)

    async def Route(self, request, context):  # noqa: N802
        self.requests.append(request)
        self.request_ids.append(request_id_from_context(context))
        for worker_id, address in self.workers:
            if worker_id not in request.exclude_worker_ids:
                return router_pb2.RouteResponse(worker_id=worker_id, address=address)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker")

    async def ListWorkers(self, request, context):  # noqa: N802
        return router_pb2.ListWorkersResponse(workers=[
            router_pb2.WorkerStatus(info=router_pb2.WorkerInfo(worker_id=w, address=a, model=MODEL,
                                                               role=router_pb2.WORKER_ROLE_DECODE), healthy=True)
            for w, a in self.workers
        ])


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    num_tokens: int = 3
    delay_s: float = 0.0
    fail_before: grpc.StatusCode | None = None  # abort before any token
    fail_after_first: grpc.StatusCode | None = None  # abort after one token
    error_detail: int = 0  # send FINISH_REASON_ERROR with this ErrorCode as the first message
    linger_s: float = 0.0  # after the last token, before the call ends (the real worker's bookkeeping)
    request_ids: list[str | None] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def Generate(self, request, context) -> AsyncIterator[worker_pb2.GenerateResponse]:  # noqa: N802
        self.request_ids.append(request_id_from_context(context))
        if self.fail_before is not None:
            await context.abort(self.fail_before, "scripted failure",
                                (("tandem-error-field", "sampling.max_tokens"),))
        if self.error_detail:
            yield worker_pb2.GenerateResponse(
                finish_reason=common_pb2.FINISH_REASON_ERROR,
                error=common_pb2.ErrorDetail(code=self.error_detail, message="bad stop", field="stop"))
            return
        try:
            for i in range(self.num_tokens):
                if i == 1 and self.fail_after_first is not None:
                    await context.abort(self.fail_after_first, "scripted mid-stream failure")
                await asyncio.sleep(self.delay_s)
                last = i == self.num_tokens - 1
                response = worker_pb2.GenerateResponse(delta=common_pb2.TokenDelta(token_ids=[10 + i], text=f"t{i}"))
                if last:
                    response.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                             completion_tokens=self.num_tokens,
                                                             cached_prompt_tokens=1))
                yield response
            await asyncio.sleep(self.linger_s)
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled in the sleep, or closed at a yield whose send was pending (as the real worker's
            # handler sees it, depending on where the cancellation lands).
            self.cancelled.append(request.request_id)
            raise


async def _start(servicer: object, add: object) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)  # type: ignore[operator]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class Mesh:
    router: FakeRouter
    worker: FakeWorker
    worker_address: str
    pipeline: Pipeline
    servers: list[grpc.aio.Server]


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    worker = FakeWorker()
    worker_server, worker_address = await _start(worker, worker_pb2_grpc.add_WorkerServiceServicer_to_server)
    router = FakeRouter([("w1", worker_address)])
    router_server, router_address = await _start(router, router_pb2_grpc.add_RouterServiceServicer_to_server)
    pipeline = Pipeline(model_name=MODEL, max_model_len=64, tokenizer=FakeTokenizer(),
                        router_address=router_address, metrics=FrontendMetrics(CollectorRegistry()))
    yield Mesh(router, worker, worker_address, pipeline, [worker_server, router_server])
    await pipeline.close()
    for server in [worker_server, router_server]:
        await server.stop(0)


def _request(request_id: str = "req-1", max_tokens: int | None = None) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=max_tokens), "completions", True)


async def _collect(pipeline: Pipeline, request: GenerationRequest) -> list:
    async with aclosing(pipeline.generate(request)) as outputs:
        return [output async for output in outputs]


def _sample(pipeline: Pipeline, name: str, labels: dict[str, str]) -> float | None:
    return pipeline.metrics.registry.get_sample_value(name, labels)


async def test_streams_tokens_with_usage_and_request_id(mesh: Mesh) -> None:
    outputs = await _collect(mesh.pipeline, _request())
    assert [o.text for o in outputs] == ["t0", "t1", "t2"]
    assert [o.token_ids for o in outputs] == [[10], [11], [12]]
    assert outputs[-1].finish_reason is FinishReason.LENGTH and not outputs[0].finished
    assert (outputs[-1].num_prompt_tokens, outputs[-1].num_output_tokens, outputs[-1].num_cached_tokens) == (3, 3, 1)
    assert mesh.router.request_ids == ["req-1"] and mesh.worker.request_ids == ["req-1"]
    labels = {"model": MODEL, "endpoint": "completions", "request_type": "stream", "status": "success"}
    assert _sample(mesh.pipeline, "tandem_frontend_requests_total", labels) == 1
    assert _sample(mesh.pipeline, "tandem_frontend_output_tokens_total", {"model": MODEL}) == 3
    assert _sample(mesh.pipeline, "tandem_frontend_inflight_requests", {"model": MODEL}) == 0
    assert _sample(mesh.pipeline, "tandem_frontend_time_to_first_token_seconds_count", {"model": MODEL}) == 1
    assert _sample(mesh.pipeline, "tandem_frontend_inter_token_latency_seconds_count", {"model": MODEL}) == 2


async def test_reroutes_away_from_an_unreachable_worker(mesh: Mesh) -> None:
    mesh.router.workers.insert(0, ("dead", _closed_port_address()))
    outputs = await _collect(mesh.pipeline, _request())
    assert outputs[-1].finished
    assert [list(r.exclude_worker_ids) for r in mesh.router.requests] == [[], ["dead"]]


async def test_gives_up_after_max_reroutes(mesh: Mesh) -> None:
    mesh.router.workers = [(f"dead{i}", _closed_port_address()) for i in range(5)]
    with pytest.raises(Unavailable):
        await _collect(mesh.pipeline, _request())
    assert len(mesh.router.requests) == 3  # the first try and two re-routes
    labels = {"model": MODEL, "endpoint": "completions", "request_type": "stream", "status": "unavailable"}
    assert _sample(mesh.pipeline, "tandem_frontend_requests_total", labels) == 1


async def test_no_healthy_worker_is_unavailable(mesh: Mesh) -> None:
    mesh.router.workers = []
    with pytest.raises(Unavailable, match="no healthy worker"):
        await _collect(mesh.pipeline, _request())


@pytest.mark.parametrize(("code", "error"), [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
])
async def test_worker_status_codes_map_to_errors(mesh: Mesh, code: grpc.StatusCode, error: type) -> None:
    mesh.worker.fail_before = code
    with pytest.raises(error, match="scripted failure") as info:
        await _collect(mesh.pipeline, _request())
    assert info.value.field == "max_tokens"  # from the worker's trailing metadata
    # A full worker is worth another (the router then has none left); a bad request is not.
    assert len(mesh.router.requests) == (2 if code == grpc.StatusCode.RESOURCE_EXHAUSTED else 1)


async def test_in_stream_error_detail_keeps_its_field(mesh: Mesh) -> None:
    mesh.worker.error_detail = common_pb2.ERROR_CODE_INVALID_ARGUMENT
    with pytest.raises(InvalidRequest) as info:
        await _collect(mesh.pipeline, _request())
    assert info.value.field == "stop"


async def test_failure_after_first_token_without_another_worker_ends_in_an_error(mesh: Mesh) -> None:
    mesh.worker.fail_after_first = grpc.StatusCode.UNAVAILABLE
    seen = []
    with pytest.raises(Unavailable, match="after 1 tokens"):
        async with aclosing(mesh.pipeline.generate(_request())) as outputs:
            async for output in outputs:
                seen.append(output.text)
    # The migration was tried: the router was asked again, without the failed worker.
    assert seen == ["t0"] and len(mesh.router.requests) == 2
    assert list(mesh.router.requests[1].exclude_worker_ids) == ["w1"]


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_closing_the_iterator_cancels_the_worker_call(mesh: Mesh) -> None:
    mesh.worker.num_tokens, mesh.worker.delay_s = 1000, 0.01
    async with aclosing(mesh.pipeline.generate(_request("req-close"))) as outputs:
        await anext(outputs)
    await _wait_for(lambda: mesh.worker.cancelled == ["req-close"])
    labels = {"model": MODEL, "endpoint": "completions", "request_type": "stream", "status": "cancelled"}
    assert _sample(mesh.pipeline, "tandem_frontend_requests_total", labels) == 1
    assert _sample(mesh.pipeline, "tandem_frontend_inflight_requests", {"model": MODEL}) == 0


async def test_cancelling_the_task_cancels_the_worker_call(mesh: Mesh) -> None:
    mesh.worker.num_tokens, mesh.worker.delay_s = 1000, 0.01
    task = asyncio.create_task(_collect(mesh.pipeline, _request("req-cancel")))
    await _wait_for(lambda: mesh.worker.request_ids)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _wait_for(lambda: mesh.worker.cancelled == ["req-cancel"])


async def test_a_finished_request_leaves_its_worker_call_to_end_by_itself(mesh: Mesh) -> None:
    """A cancel after the last token would race the worker's own end of the call (a reset stream both
    ends must handle): every finished request ends normally at the worker, even one that lingers."""
    mesh.worker.linger_s = 0.02
    for i in range(10):
        assert (await _collect(mesh.pipeline, _request(f"r{i}")))[-1].finished
    await asyncio.sleep(0.1)
    assert mesh.worker.request_ids == [f"r{i}" for i in range(10)] and mesh.worker.cancelled == []


async def test_num_healthy_workers(mesh: Mesh) -> None:
    assert await mesh.pipeline.num_healthy_workers() == 1
    mesh.router.workers = []
    assert await mesh.pipeline.num_healthy_workers() == 0
