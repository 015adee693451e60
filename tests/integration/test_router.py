"""The router's gRPC server on port 0, with fake workers that speak the real RegisterWorker stream."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.router.config import RouterConfig
from services.router.server import RunningRouter, serve
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2

pytestmark = pytest.mark.integration

_ports = itertools.count(20001)


class FakeWorker:
    """A worker reduced to its registration stream: register, report loads, hang up."""

    def __init__(self, stub: router_pb2_grpc.RouterServiceStub, worker_id: str, model: str = "m",
                 role: router_pb2.WorkerRole = router_pb2.WORKER_ROLE_DECODE) -> None:
        self.info = router_pb2.WorkerInfo(worker_id=worker_id, role=role, address=f"127.0.0.1:{next(_ports)}",
                                          model=model, max_model_len=2048, block_size=16)
        self._stub = stub
        self._outbox: asyncio.Queue[router_pb2.RegisterWorkerRequest | None] = asyncio.Queue()
        self.call: grpc.aio.StreamStreamCall | None = None

    async def _messages(self) -> AsyncIterator[router_pb2.RegisterWorkerRequest]:
        yield router_pb2.RegisterWorkerRequest(register=self.info)
        while (message := await self._outbox.get()) is not None:
            yield message

    async def register(self) -> None:
        self.call = self._stub.RegisterWorker(self._messages())
        response = await self.call.read()
        assert response.registered

    def report(self, running: int = 0, waiting: int = 0) -> None:
        load = worker_pb2.WorkerLoad(num_running=running, num_waiting=waiting, num_kv_blocks_total=100)
        self._outbox.put_nowait(router_pb2.RegisterWorkerRequest(load=load))

    def hang_up(self) -> None:
        self._outbox.put_nowait(None)


@pytest.fixture
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve(RouterConfig(host="127.0.0.1", port=0, metrics_port=0), rng=random.Random(0))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def channel(router: RunningRouter) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(router.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(channel)


async def workers(stub: router_pb2_grpc.RouterServiceStub) -> list[router_pb2.WorkerStatus]:
    return list((await stub.ListWorkers(router_pb2.ListWorkersRequest())).workers)


async def eventually(stub: router_pb2_grpc.RouterServiceStub,
                     condition: Callable[[list[router_pb2.WorkerStatus]], bool]) -> None:
    """Load reports are fire-and-forget; wait until the router's listing shows one."""
    deadline = time.monotonic() + 5
    while not condition(await workers(stub)):
        assert time.monotonic() < deadline, await workers(stub)
        await asyncio.sleep(0.01)


async def route(stub: router_pb2_grpc.RouterServiceStub, model: str = "m", exclude: tuple[str, ...] = ()) -> str:
    response = await stub.Route(router_pb2.RouteRequest(request_id="req-1", model=model, token_ids=[1, 2, 3],
                                                        exclude_worker_ids=exclude))
    return response.worker_id


async def test_registered_worker_is_listed_and_routed_to(stub: router_pb2_grpc.RouterServiceStub,
                                                         router: RunningRouter) -> None:
    worker = FakeWorker(stub, "w1")
    await worker.register()
    (status,) = await workers(stub)
    assert (status.info.worker_id, status.info.model, status.healthy) == ("w1", "m", True)
    response = await stub.Route(router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1]))
    assert (response.worker_id, response.address) == ("w1", worker.info.address)
    assert await route(stub, model="") == "w1"  # empty model: any
    assert router.metrics.registered_workers._value.get() == 1
    assert router.metrics.route_decisions.labels(outcome="routed")._value.get() == 2


async def test_least_loaded_worker_wins_and_routed_requests_count_until_the_next_report(
        stub: router_pb2_grpc.RouterServiceStub) -> None:
    busy, idle = FakeWorker(stub, "busy"), FakeWorker(stub, "idle")
    await busy.register()
    await idle.register()
    busy.report(running=2, waiting=1)
    idle.report(running=1)
    await eventually(stub, lambda ws: sum(w.load.num_running for w in ws) == 3)
    # idle has 1, busy 3: idle takes two more requests before they are level
    assert [await route(stub) for _ in range(2)] == ["idle", "idle"]
    assert await route(stub) in {"busy", "idle"}
    # a fresh report replaces the routed-since count
    busy.report(running=0)
    idle.report(running=5)
    await eventually(stub, lambda ws: {w.info.worker_id: w.load.num_running for w in ws} == {"busy": 0, "idle": 5})
    assert await route(stub) == "busy"


async def test_worker_is_removed_when_its_stream_ends_or_breaks(stub: router_pb2_grpc.RouterServiceStub,
                                                                router: RunningRouter) -> None:
    polite, abrupt = FakeWorker(stub, "polite"), FakeWorker(stub, "abrupt")
    await polite.register()
    await abrupt.register()
    polite.hang_up()
    await eventually(stub, lambda ws: [w.info.worker_id for w in ws] == ["abrupt"])
    assert abrupt.call is not None
    abrupt.call.cancel()
    await eventually(stub, lambda ws: ws == [])
    assert router.metrics.registered_workers._value.get() == 0
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await route(stub)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reregistering_the_same_id_replaces_the_old_entry(stub: router_pb2_grpc.RouterServiceStub) -> None:
    first = FakeWorker(stub, "w1")
    await first.register()
    second = FakeWorker(stub, "w1")
    second.info.address = "127.0.0.1:30001"
    await second.register()
    first.hang_up()  # the old stream ending must not remove the new registration
    assert first.call is not None
    assert await first.call.read() == grpc.aio.EOF
    (status,) = await workers(stub)
    assert status.info.address == "127.0.0.1:30001"


async def test_exclude_list_model_and_role_are_respected(stub: router_pb2_grpc.RouterServiceStub) -> None:
    for worker in (FakeWorker(stub, "a"), FakeWorker(stub, "b"), FakeWorker(stub, "other", model="x"),
                   FakeWorker(stub, "pre", role=router_pb2.WORKER_ROLE_PREFILL)):
        await worker.register()
    assert {await route(stub, exclude=("a",)) for _ in range(5)} == {"b"}
    assert await route(stub, model="x") == "other"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await route(stub, exclude=("a", "b"))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "exclude" in (raised.value.details() or "")


async def test_unavailable_names_the_model(stub: router_pb2_grpc.RouterServiceStub, router: RunningRouter) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await route(stub, model="SmolLM2-135M-Instruct")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy worker serves model 'SmolLM2-135M-Instruct'" in (raised.value.details() or "")
    assert router.metrics.route_decisions.labels(outcome="unavailable")._value.get() == 1


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (router_pb2.RouteRequest(model="m", token_ids=[1]), "request_id"),
        (router_pb2.RouteRequest(request_id="r", model="m"), "token_ids"),
    ],
)
async def test_route_invalid_argument_names_the_field(stub: router_pb2_grpc.RouterServiceStub,
                                                      request_: router_pb2.RouteRequest, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Route(request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")


async def test_request_id_may_come_from_metadata(stub: router_pb2_grpc.RouterServiceStub) -> None:
    await FakeWorker(stub, "w1").register()
    response = await stub.Route(router_pb2.RouteRequest(model="m", token_ids=[1]),
                                metadata=(("x-request-id", "from-header"),))
    assert response.worker_id == "w1"


@pytest.mark.parametrize(
    ("first", "field"),
    [
        (router_pb2.RegisterWorkerRequest(load=worker_pb2.WorkerLoad()), "register"),
        (router_pb2.RegisterWorkerRequest(register=router_pb2.WorkerInfo(
            role=router_pb2.WORKER_ROLE_DECODE, address="h:1", model="m")), "register.worker_id"),
        (router_pb2.RegisterWorkerRequest(register=router_pb2.WorkerInfo(
            worker_id="w", role=router_pb2.WORKER_ROLE_DECODE, address="no-port", model="m")), "register.address"),
        (router_pb2.RegisterWorkerRequest(register=router_pb2.WorkerInfo(
            worker_id="w", address="h:1", model="m")), "register.role"),
    ],
)
async def test_bad_registration_is_refused_naming_the_field(stub: router_pb2_grpc.RouterServiceStub,
                                                            first: router_pb2.RegisterWorkerRequest,
                                                            field: str) -> None:
    call = stub.RegisterWorker(iter([first]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}:")
    assert await workers(stub) == []


async def test_health_check_and_watch_follow_shutdown(channel: grpc.aio.Channel, router: RunningRouter) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tandem.router.v1.RouterService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="tandem.router.v1.RouterService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(router.stop(grace_s=0.2))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping


async def test_stop_ends_registration_streams_promptly(stub: router_pb2_grpc.RouterServiceStub,
                                                       router: RunningRouter) -> None:
    worker = FakeWorker(stub, "w1")
    await worker.register()
    started = time.monotonic()
    await router.stop(grace_s=10)
    assert time.monotonic() - started < 2
    assert worker.call is not None
    assert await worker.call.read() == grpc.aio.EOF


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name async for response in responses
             for service in response.list_services_response.service}
    assert {"tandem.router.v1.RouterService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


async def test_metrics_endpoint_serves_prometheus_text() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = await serve(RouterConfig(host="127.0.0.1", port=0, metrics_port=port))
    try:
        assert running.metrics_port == port
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
        text = body.decode()
        for name in ("tandem_router_registered_workers", 'tandem_router_route_decisions_total{outcome="routed"}',
                     "tandem_router_route_decision_duration_seconds_bucket",
                     # the process and garbage-collector metrics every service shows
                     "process_resident_memory_bytes", 'python_gc_collections_total{generation="2"}',
                     'tandem_gc_pause_seconds_count{generation="0"}', "tandem_gc_frozen_objects"):
            assert name in text
    finally:
        await running.stop(grace_s=0)


async def test_route_stream_answers_each_request_by_call_id_and_refusals_do_not_end_it(
        stub: router_pb2_grpc.RouterServiceStub, router: RunningRouter) -> None:
    call = stub.RouteStream()
    # No worker yet: an in-stream UNAVAILABLE, and the stream stays open.
    await call.write(router_pb2.RouteStreamRequest(call_id=7, route=router_pb2.RouteRequest(
        request_id="r0", model="m", token_ids=[1])))
    answer = await call.read()
    assert answer.call_id == 7 and answer.WhichOneof("result") == "error"
    assert answer.error.code == common_pb2.ERROR_CODE_UNAVAILABLE and "no decode worker" in answer.error.message
    worker = FakeWorker(stub, "w1")
    await worker.register()
    await call.write(router_pb2.RouteStreamRequest(call_id=8, route=router_pb2.RouteRequest(
        request_id="r1", model="m", token_ids=[])))
    await call.write(router_pb2.RouteStreamRequest(call_id=9, route=router_pb2.RouteRequest(
        request_id="r2", model="m", token_ids=[1, 2])))
    bad, good = await call.read(), await call.read()
    assert (bad.call_id, bad.error.code, bad.error.field) == (8, common_pb2.ERROR_CODE_INVALID_ARGUMENT, "token_ids")
    assert "token_ids" in bad.error.message
    assert (good.call_id, good.route.worker_id, good.route.address) == (9, "w1", worker.info.address)
    assert router.metrics.route_decisions.labels(outcome="routed")._value.get() == 1
    assert router.metrics.route_decisions.labels(outcome="invalid")._value.get() == 1
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF


async def test_a_stopping_router_ends_its_route_streams_at_once(router: RunningRouter) -> None:
    # A frontend never closes its stream: the router must not wait out its grace period for it.
    async with grpc.aio.insecure_channel(router.address) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).RouteStream()
        await call.write(router_pb2.RouteStreamRequest(call_id=1, route=router_pb2.RouteRequest(
            request_id="r", model="m", token_ids=[1])))
        await call.read()
        started = time.monotonic()
        await router.stop(grace_s=10)
        assert time.monotonic() - started < 2
        assert await call.read() is grpc.aio.EOF  # ended by the router: callers fall back or reopen


async def test_only_candidate_is_set_while_one_decode_worker_could_serve_the_model(
        stub: router_pb2_grpc.RouterServiceStub) -> None:
    async def only_candidate(**fields: object) -> bool:
        request = router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1, 2], **fields)  # type: ignore[arg-type]
        return (await stub.Route(request)).only_candidate

    first = FakeWorker(stub, "w1")
    await first.register()
    await FakeWorker(stub, "other-model", model="m2").register()  # serves another model: no rival
    assert await only_candidate()
    # The frontend may not predict what the router would decide differently for this request.
    assert not await only_candidate(overrides=router_pb2.RoutingOverrides(kv_overlap_weight=1.0))
    assert not await only_candidate(exclude_worker_ids=["nobody"])

    prefill = FakeWorker(stub, "p1", role=router_pb2.WORKER_ROLE_PREFILL)
    await prefill.register()  # a long prompt could now go to a prefill worker
    await eventually(stub, lambda ws: len(ws) == 3)
    assert not await only_candidate()
    prefill.hang_up()
    await eventually(stub, lambda ws: len(ws) == 2)
    assert await only_candidate()

    second = FakeWorker(stub, "w2")
    await second.register()
    await eventually(stub, lambda ws: len(ws) == 3)
    assert not await only_candidate()
    second.hang_up()
    await eventually(stub, lambda ws: len(ws) == 2)
    assert await only_candidate()
