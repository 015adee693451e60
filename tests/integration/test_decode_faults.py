"""Decode worker failure paths that a real engine cannot be made to show on demand.

The worker runs on port 0 as in production; only the engine is a scripted fake, built through
the same ``engine_factory`` hook that ``create_engine`` fills.
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker, serve
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router
from tandem.engine.config import EngineConfig
from tandem.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput, StepInfo
from tandem.errors import ResourceExhausted
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

# The first prompt token picks the fake's behaviour.
QUEUE_FULL, FAIL_MID_STREAM, SLOW = 0, 1, 2


class ScriptedEngine:
    model_name = "fake-model"
    max_model_len = 128

    def __init__(self, config: EngineConfig, on_step: Callable[[StepInfo], None] | None) -> None:
        self.running: set[str] = set()
        self.alive = True
        self.shut_down = False
        self.release = asyncio.Event()  # lets SLOW requests finish
        self.loaded = asyncio.Event()  # start() waits for it; cleared to simulate a slow model load
        self.loaded.set()

    async def start(self) -> None:
        await self.loaded.wait()

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        behaviour = request.prompt_token_ids[0]
        if behaviour == QUEUE_FULL:
            raise ResourceExhausted("the engine queue is full (4 waiting); retry later")
        self.running.add(request.request_id)
        try:
            yield RequestOutput(request.request_id, [7], "a", num_prompt_tokens=1, num_output_tokens=1)
            if behaviour == FAIL_MID_STREAM:
                raise RuntimeError("CUDA error: an illegal memory access")
            await self.release.wait()
            yield RequestOutput(request.request_id, [8], "b", FinishReason.STOP, 1, 2)
        finally:
            self.running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), num_kv_blocks_total=8, num_free_queue_slots=4)

    def healthy(self) -> bool:
        return self.alive

    async def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The fake engine loads nothing; the worker only checks that this looks like a model directory."""
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


@pytest.fixture
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def worker(model_dir: Path, router: RunningRouter) -> AsyncIterator[DecodeWorker]:
    config = DecodeConfig(host="127.0.0.1", port=0, metrics_port=0, router_address=router.address,
                          model=str(model_dir), worker_id="fake-1")
    running = await serve(config, engine_factory=ScriptedEngine)
    assert running.registration is not None
    await running.registration.wait_registered(5)
    yield running
    running.engine.release.set()  # type: ignore[attr-defined]
    await running.stop(drain_timeout_s=1)


@pytest.fixture
async def channel(worker: DecodeWorker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        yield channel


def request(behaviour: int) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(request_id=f"r{behaviour}", prompt_token_ids=[behaviour, 5],
                                      sampling=common_pb2.SamplingParams(max_tokens=4))


async def listed_worker_ids(router: RunningRouter) -> list[str]:
    async with grpc.aio.insecure_channel(router.address) as channel:
        response = await router_pb2_grpc.RouterServiceStub(channel).ListWorkers(router_pb2.ListWorkersRequest())
    return [status.info.worker_id for status in response.workers]


async def until(condition: Callable[[], object], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_queue_full_is_resource_exhausted(channel: grpc.aio.Channel, worker: DecodeWorker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(QUEUE_FULL)):
            pass
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in (raised.value.details() or "")
    assert worker.metrics.requests.labels(outcome="rejected")._value.get() == 1


async def test_failure_mid_stream_ends_with_an_error_response(channel: grpc.aio.Channel,
                                                              worker: DecodeWorker) -> None:
    responses = [r async for r in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(FAIL_MID_STREAM))]
    assert [list(r.delta.token_ids) for r in responses] == [[7], []]
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert last.error.code == common_pb2.ERROR_CODE_INTERNAL
    assert "illegal memory access" in last.error.message
    assert worker.metrics.requests.labels(outcome="error")._value.get() == 1


async def test_engine_death_turns_not_serving_leaves_the_router_and_fails_the_worker(channel: grpc.aio.Channel,
                                                                    worker: DecodeWorker,
                                                                    router: RunningRouter) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="tandem.worker.v1.WorkerService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    worker.engine.alive = False  # type: ignore[attr-defined]
    assert (await asyncio.wait_for(watch.read(), 2)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await listed_worker_ids(router) == []
    watch.cancel()
    # ... and says it failed: its process stops and exits non-zero, for a supervisor to start a new one.
    await asyncio.wait_for(worker.failed.wait(), 2)


async def test_sigterm_drain_finishes_in_flight_requests_and_refuses_new_ones(
        channel: grpc.aio.Channel, worker: DecodeWorker, router: RunningRouter) -> None:
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    in_flight = stub.Generate(request(SLOW))
    assert list((await in_flight.read()).delta.token_ids) == [7]
    stopping = asyncio.create_task(worker.stop(drain_timeout_s=10))
    await until(lambda: worker.registration is not None and not worker.registration.registered)
    assert await listed_worker_ids(router) == []  # the router stopped routing here first
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(request(SLOW)):
            pass
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopping.done()
    worker.engine.release.set()  # type: ignore[attr-defined]
    last = await in_flight.read()
    assert (list(last.delta.token_ids), last.finish_reason) == ([8], common_pb2.FINISH_REASON_STOP)
    await asyncio.wait_for(stopping, 5)
    assert worker.engine.shut_down  # type: ignore[attr-defined]


async def test_drain_timeout_cancels_what_is_left(channel: grpc.aio.Channel, worker: DecodeWorker) -> None:
    in_flight = worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(SLOW))
    await in_flight.read()
    started = time.monotonic()
    await worker.stop(drain_timeout_s=0.2)
    assert time.monotonic() - started < 3
    assert worker.engine.running == set()  # type: ignore[attr-defined]  # the engine stream was closed
    with pytest.raises(grpc.aio.AioRpcError):
        await in_flight.read()


async def test_router_restart_is_followed_by_reregistration(worker: DecodeWorker, router: RunningRouter) -> None:
    registration = worker.registration
    assert registration is not None
    await router.stop(grace_s=0)
    await until(lambda: not registration.registered)
    config = RouterConfig(host="127.0.0.1", port=router.port, metrics_port=0)
    restarted = await serve_router(config)
    try:
        await registration.wait_registered(5)
        assert await listed_worker_ids(restarted) == ["fake-1"]
    finally:
        await restarted.stop(grace_s=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_not_serving_while_the_engine_loads_then_serving(model_dir: Path) -> None:
    engines: list[ScriptedEngine] = []

    def slow_loading(config: EngineConfig, on_step: Callable[[StepInfo], None] | None) -> ScriptedEngine:
        engine = ScriptedEngine(config, on_step)
        engine.loaded.clear()
        engines.append(engine)
        return engine

    port, metrics_port = free_port(), free_port()
    config = DecodeConfig(host="127.0.0.1", port=port, metrics_port=metrics_port, model=str(model_dir))
    starting = asyncio.create_task(serve(config, engine_factory=slow_loading))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request_ = health_pb2.HealthCheckRequest(service="tandem.worker.v1.WorkerService")
        response = await health.Check(request_, wait_for_ready=True)
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        engines[0].loaded.set()
        worker = await starting
        try:
            assert (await health.Check(request_)).status == health_pb2.HealthCheckResponse.SERVING
            assert worker.worker_id == f"decode-127.0.0.1-{port}"
            await until(lambda: worker.metrics.kv_blocks_total._value.get() == 8)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
            for name in ("tandem_worker_running_requests", "tandem_worker_kv_blocks_total 8.0",
                         "tandem_worker_prefix_cache_hit_rate", "tandem_worker_step_duration_seconds_bucket",
                         "tandem_worker_batch_wait_seconds_bucket",
                         'tandem_worker_requests_total{outcome="stop"}'):
                assert name in text
        finally:
            await worker.stop(drain_timeout_s=0)
