"""The Consul registry backend end to end against FakeConsulAgent: services register with a gRPC
check and deregister, the router follows the passing set with blocking queries, and a failing
check takes a worker out of routing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.decode.config import DecodeConfig
from services.decode.server import serve as serve_decode
from services.frontend.server import FrontendConfig
from services.frontend.server import serve as serve_frontend
from services.router.config import RouterConfig
from services.router.server import RunningRouter, serve
from tandem.discovery.consul import ConsulRegistration, ConsulSettings
from tandem.engine.types import EngineStats
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tests.integration.fake_consul import CRITICAL, FakeConsulAgent

pytestmark = [
    pytest.mark.integration,
    # py-consul 1.8.0 passes aiohttp a deprecated argument; nothing this code can change.
    pytest.mark.filterwarnings("ignore:verify_ssl is deprecated:DeprecationWarning"),
]

CHECK_INTERVAL_S = 0.05


@pytest.fixture
async def agent() -> AsyncIterator[FakeConsulAgent]:
    running = FakeConsulAgent()
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
async def router(agent: FakeConsulAgent) -> AsyncIterator[RunningRouter]:
    running = await serve(RouterConfig(
        host="127.0.0.1", port=0, metrics_port=0, registry="consul", consul_address=agent.address,
        consul_check_interval_s=CHECK_INTERVAL_S, health_probe_interval_s=0.05))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def stub(router: RunningRouter) -> AsyncIterator[router_pb2_grpc.RouterServiceStub]:
    async with grpc.aio.insecure_channel(router.address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)


class Worker:
    """A gRPC health service that registers itself with the agent, as a decode worker does."""

    def __init__(self, agent: FakeConsulAgent, worker_id: str) -> None:
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        settings = ConsulSettings(address=agent.address, check_interval_s=CHECK_INTERVAL_S)
        self.registration = ConsulRegistration(settings, role="decode", service_id=worker_id, address=self.address,
                                               meta={"model": "m", "max_model_len": "2048", "block_size": "16"})

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.registration.start()
        await self.registration.wait_registered(5)

    async def stop(self) -> None:
        await self.registration.stop()
        await self.server.stop(0)


@pytest.fixture
async def worker(agent: FakeConsulAgent) -> AsyncIterator[Worker]:
    running = Worker(agent, "decode-1")
    await running.start()
    yield running
    await running.stop()


async def _until(condition: Callable[[], object], timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def _listed(stub: router_pb2_grpc.RouterServiceStub) -> list[str]:
    reply = await stub.ListWorkers(router_pb2.ListWorkersRequest())
    return [status.info.worker_id for status in reply.workers if status.healthy]


async def _wait_listed(stub: router_pb2_grpc.RouterServiceStub, expected: list[str]) -> None:
    deadline = time.monotonic() + 5
    while (listed := await _listed(stub)) != expected:
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.01)


async def test_a_registered_worker_is_routed_to_once_its_check_passes(
        agent: FakeConsulAgent, router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub,
        worker: Worker) -> None:
    assert agent.services["decode-1"].grpc_target == worker.address  # a gRPC check, run by the agent
    await _wait_listed(stub, ["decode-1"])
    reply = await stub.Route(router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1, 2]))
    assert (reply.worker_id, reply.address) == ("decode-1", worker.address)
    (status,) = (await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
    assert status.info.max_model_len == 2048 and status.info.block_size == 16
    # The router registered itself too, and follows the catalogue with blocking queries.
    await _until(lambda: agent.passing("tandem-router"))
    assert agent.num_blocking_queries > 0


async def test_a_check_turning_critical_takes_the_worker_out_of_routing(
        agent: FakeConsulAgent, stub: router_pb2_grpc.RouterServiceStub, worker: Worker) -> None:
    await _wait_listed(stub, ["decode-1"])
    agent.force_check("decode-1", CRITICAL)  # a failing check, whatever the worker says
    await _wait_listed(stub, [])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Route(router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    agent.force_check("decode-1", None)
    await _wait_listed(stub, ["decode-1"])


async def test_a_worker_reporting_not_serving_fails_its_check(
        agent: FakeConsulAgent, stub: router_pb2_grpc.RouterServiceStub, worker: Worker) -> None:
    await _wait_listed(stub, ["decode-1"])
    await worker.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # e.g. draining
    await _until(lambda: not agent.passing("tandem-decode"))
    await _wait_listed(stub, [])


async def test_deregistration_removes_the_worker(
        agent: FakeConsulAgent, stub: router_pb2_grpc.RouterServiceStub) -> None:
    first, second = Worker(agent, "decode-1"), Worker(agent, "decode-2")
    for worker in (first, second):
        await worker.start()
    await _wait_listed(stub, ["decode-1", "decode-2"])
    await first.stop()
    assert "decode-1" not in agent.services
    await _wait_listed(stub, ["decode-2"])
    await second.stop()
    await _wait_listed(stub, [])


async def test_register_worker_streams_are_refused_in_consul_mode(stub: router_pb2_grpc.RouterServiceStub) -> None:
    async def messages() -> AsyncIterator[router_pb2.RegisterWorkerRequest]:
        yield router_pb2.RegisterWorkerRequest(register=router_pb2.WorkerInfo(
            worker_id="w", role=router_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1", model="m"))

    call = stub.RegisterWorker(messages())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


class IdleEngine:
    """Just enough engine for a decode worker to start, serve health and report stats."""

    model_name = "m"
    max_model_len = 128

    def __init__(self, config: object, on_step: object) -> None:
        self.alive = True

    async def start(self) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_running=3, num_kv_blocks_total=8, num_free_queue_slots=4)

    def healthy(self) -> bool:
        return self.alive

    async def shutdown(self) -> None:
        pass


async def test_a_decode_worker_registers_with_consul_and_deregisters_on_stop(
        agent: FakeConsulAgent, router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub) -> None:
    config = DecodeConfig(host="127.0.0.1", port=0, metrics_port=0, worker_id="decode-9", registry="consul",
                          consul_address=agent.address, consul_check_interval_s=CHECK_INTERVAL_S)
    worker = await serve_decode(config, engine_factory=IdleEngine)  # type: ignore[arg-type]
    try:
        await _wait_listed(stub, ["decode-9"])
        assert agent.services["decode-9"].meta["max_model_len"] == "128"
        # Consul carries no load: the router reads it from the worker's GetStats.
        deadline = time.monotonic() + 5
        while (await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers[0].load.num_running != 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await worker.stop(drain_timeout_s=0)
    assert "decode-9" not in agent.services  # deregistered, not left to fail its checks
    await _wait_listed(stub, [])


async def test_the_frontend_registers_its_grpc_port_and_deregisters_on_stop(
        agent: FakeConsulAgent, router: RunningRouter, model_path: Path) -> None:
    frontend = await serve_frontend(FrontendConfig(
        model=str(model_path), host="127.0.0.1", http_port=0, grpc_port=0, router_address=router.address,
        enable_kserve=False, registry="consul", consul_address=agent.address))
    try:
        service_id = f"frontend-127.0.0.1:{frontend.grpc_port}"
        await _until(lambda: service_id in agent.services)
        assert agent.services[service_id].meta["http_port"] == str(frontend.http_port)
        await _until(lambda: agent.passing("tandem-frontend") == [service_id])  # its gRPC health passes
    finally:
        await frontend.stop()
    assert service_id not in agent.services
