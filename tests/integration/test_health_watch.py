"""The router's early failure detection against workers reduced to a health service and a
registration stream: NOT_SERVING, a dead server, a hung one, failure reports from callers, and the
worker's process exiting on this host."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.decode.registration import RouterRegistration
from services.router.config import RouterConfig
from services.router.server import RunningRouter, serve
from tandem.procinfo import ProcessIdentity, process_to_proto
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2

pytestmark = pytest.mark.integration

PROBE_INTERVAL_S, PROBE_TIMEOUT_S, QUARANTINE_MIN_S = 0.05, 0.3, 0.2


class HangableHealth(health.aio.HealthServicer):
    """The standard health servicer, except that it can stop answering (a SIGSTOPped process)."""

    def __init__(self) -> None:
        super().__init__()
        self.answering = asyncio.Event()
        self.answering.set()

    async def Check(self, request, context):  # noqa: N802
        await self.answering.wait()
        return await super().Check(request, context)


class Worker:
    """A health service plus the registration stream a decode worker keeps with the router."""

    def __init__(self, router_address: str, worker_id: str, process: ProcessIdentity | None = None) -> None:
        self.health = HangableHealth()
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.worker_id = worker_id
        info = router_pb2.WorkerInfo(worker_id=worker_id, role=router_pb2.WORKER_ROLE_DECODE,
                                     address=f"127.0.0.1:{self.port}", model="m",
                                     process=process_to_proto(process) if process else None)
        self.registration = RouterRegistration(router_address, info, lambda: worker_pb2.WorkerLoad(
            num_kv_blocks_total=100, num_free_queue_slots=8), heartbeat_s=0.1)

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.registration.start()
        await self.registration.wait_registered(5)

    async def stop(self) -> None:
        await self.registration.stop()
        await self.server.stop(0)


@pytest.fixture
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve(RouterConfig(
        host="127.0.0.1", port=0, metrics_port=0, health_probe_interval_s=PROBE_INTERVAL_S,
        health_probe_timeout_s=PROBE_TIMEOUT_S, quarantine_min_s=QUARANTINE_MIN_S))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def stub(router: RunningRouter) -> AsyncIterator[router_pb2_grpc.RouterServiceStub]:
    async with grpc.aio.insecure_channel(router.address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)


async def _started(router: RunningRouter, worker_id: str, process: ProcessIdentity | None = None) -> Worker:
    running = Worker(router.address, worker_id, process)
    await running.start()
    await _until(lambda: _watched(router, worker_id))
    return running


@pytest.fixture
async def worker(router: RunningRouter) -> AsyncIterator[Worker]:
    running = await _started(router, "w1")
    yield running
    await running.stop()


@pytest.fixture
async def spare(router: RunningRouter, worker: Worker) -> AsyncIterator[Worker]:
    """A second, healthy worker: suspect quarantines only hold while another worker is left."""
    running = await _started(router, "w2")
    yield running
    await running.stop()


def _watched(router: RunningRouter, worker_id: str) -> bool:
    assert router.health is not None
    watched = router.health._watched.get(worker_id)
    return watched is not None and watched.contacted


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def _status(stub: router_pb2_grpc.RouterServiceStub, worker_id: str = "w1") -> router_pb2.WorkerStatus:
    reply = await stub.ListWorkers(router_pb2.ListWorkersRequest())
    return next(status for status in reply.workers if status.info.worker_id == worker_id)


async def _routable(stub: router_pb2_grpc.RouterServiceStub, worker_id: str = "w1") -> bool:
    """Whether ``worker_id`` is among the workers Route picks from (a few tries: ties break at random)."""
    chosen = set()
    for _ in range(8):
        try:
            reply = await stub.Route(router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1]))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            return False
        chosen.add(reply.worker_id)
    return worker_id in chosen


def _sample(router: RunningRouter, name: str, labels: dict[str, str] | None = None) -> float:
    return router.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_not_serving_leaves_routing_at_once_and_serving_brings_it_back(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, worker: Worker) -> None:
    assert await _routable(stub)
    await worker.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    took_s = await _until(lambda: router.health is not None and router.health.reason("w1") == "not_serving")
    assert took_s < PROBE_INTERVAL_S * 4  # pushed by the Watch stream, not found by the next probe
    assert not await _routable(stub)
    status = await _status(stub)
    assert not status.healthy and status.unhealthy_reason == "not_serving"
    await worker.health.set("", health_pb2.HealthCheckResponse.SERVING)
    await _until(lambda: router.health is not None and not router.health.reason("w1"))
    assert await _routable(stub)
    assert _sample(router, "tandem_router_workers_quarantined_total", {"reason": "not_serving"}) == 1
    assert _sample(router, "tandem_router_workers_restored_total") == 1


async def test_a_dead_server_is_unreachable_before_its_registration_lapses(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, worker: Worker) -> None:
    await worker.server.stop(0)  # the registration stream stays up: only the health signal tells
    took_s = await _until(lambda: router.health is not None and router.health.reason("w1") == "unreachable")
    assert took_s < 0.5
    assert not await _routable(stub)
    assert _sample(router, "tandem_router_failure_detection_seconds_count", {"reason": "unreachable"}) == 1


async def test_a_hung_worker_is_silent_after_the_probe_timeout_and_rejoins(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, worker: Worker, spare: Worker) -> None:
    assert isinstance(worker.health, HangableHealth)
    worker.health.answering.clear()
    took_s = await _until(lambda: router.health is not None and router.health.reason("w1") == "silent")
    assert PROBE_TIMEOUT_S * 0.9 < took_s < PROBE_TIMEOUT_S + PROBE_INTERVAL_S + 0.5
    assert not await _routable(stub)
    worker.health.answering.set()
    await _until(lambda: router.health is not None and not router.health.reason("w1"))
    assert await _routable(stub)


async def test_a_callers_report_quarantines_until_a_probe_passes(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, worker: Worker, spare: Worker) -> None:
    reply = await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(
        worker_id="w1", address=f"127.0.0.1:{worker.port}", kind=router_pb2.WORKER_FAILURE_KIND_STALLED,
        detected_after_s=2.5))
    assert reply.quarantined and not await _routable(stub)
    assert (await _status(stub)).unhealthy_reason == "reported_stalled"
    assert _sample(router, "tandem_router_failure_detection_seconds_sum", {"reason": "reported_stalled"}) == 2.5
    # The worker answers its probes, so it is back after the minimum quarantine.
    took_s = await _until(lambda: router.health is not None and not router.health.reason("w1"))
    assert QUARANTINE_MIN_S * 0.9 < took_s < QUARANTINE_MIN_S + 1.0
    # A report about an address the worker no longer has (an old incarnation) is ignored.
    stale = await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(
        worker_id="w1", address="127.0.0.1:1", kind=router_pb2.WORKER_FAILURE_KIND_UNREACHABLE))
    assert not stale.quarantined and await _routable(stub)


async def test_a_report_needs_a_worker_and_a_kind(stub: router_pb2_grpc.RouterServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(worker_id="w1"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(
        worker_id="nobody", kind=router_pb2.WORKER_FAILURE_KIND_UNREACHABLE))
    assert not reply.quarantined


async def test_an_address_nobody_listens_on_is_not_held_against_the_worker(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub) -> None:
    info = router_pb2.WorkerInfo(worker_id="ghost", role=router_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1",
                                 model="m")
    registration = RouterRegistration(router.address, info, lambda: worker_pb2.WorkerLoad(num_kv_blocks_total=1))
    registration.start()
    await registration.wait_registered(5)
    await asyncio.sleep(PROBE_INTERVAL_S * 6)
    # Never answered, so never quarantined by the probes: its registration alone decides.
    assert router.health is not None and router.health.reason("ghost") == ""
    await registration.stop()


async def test_suspects_are_routed_to_when_no_other_worker_is_left(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, worker: Worker) -> None:
    # A stall report may be a slow worker, not a dead one: better slow than a 503 for everyone.
    await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(
        worker_id="w1", kind=router_pb2.WORKER_FAILURE_KIND_STALLED))
    assert await _routable(stub)
    assert _sample(router, "tandem_router_quarantine_overrides_total") >= 1
    # A worker known to be unreachable is not routed to, even alone.
    await stub.ReportWorkerFailure(router_pb2.ReportWorkerFailureRequest(
        worker_id="w1", kind=router_pb2.WORKER_FAILURE_KIND_UNREACHABLE))
    assert router.health is not None and router.health.reason("w1") == "reported_unreachable"
    assert not await _routable(stub)


class _Sleeper:
    """A real child process standing in for a worker's OS process; it reports its own identity."""

    def __init__(self) -> None:
        code = ("import dataclasses, json, time; from tandem.procinfo import own_identity; "
                "print(json.dumps(dataclasses.asdict(own_identity())), flush=True); time.sleep(600)")
        self.popen = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.popen.stdout is not None
        self.identity = ProcessIdentity(**json.loads(self.popen.stdout.readline()))

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()


async def test_a_worker_whose_process_exits_leaves_routing_before_its_connections_break(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, spare: Worker) -> None:
    # The health server and registration stay up in this process: only the exit can tell.
    process = _Sleeper()
    try:
        worker = await _started(router, "w3", process.identity)
        assert await _routable(stub, "w3")
        process.kill()
        took_s = await _until(lambda: router.health is not None and router.health.reason("w3") == "exited",
                              timeout_s=2.0)
            # The reason is "exited", so the exit poll saw it, not a failed probe or the registration; the
        # bound is loose because a loaded 2-core CI host can hold the event loop for tens of milliseconds.
        assert took_s < 0.5
        assert not await _routable(stub, "w3")
        assert _sample(router, "tandem_router_failure_detection_seconds_count", {"reason": "exited"}) == 1
        # Restarted as another process (same id and address): it is watched afresh and routed to again.
        await worker.registration.stop()
        replacement = _Sleeper()
        try:
            info = router_pb2.WorkerInfo()
            info.CopyFrom(worker.registration.info)
            info.process.CopyFrom(process_to_proto(replacement.identity))
            worker.registration = RouterRegistration(router.address, info, lambda: worker_pb2.WorkerLoad(
                num_kv_blocks_total=100, num_free_queue_slots=8), heartbeat_s=0.1)
            worker.registration.start()
            await worker.registration.wait_registered(5)
            await _until(lambda: router.health is not None and not router.health.reason("w3"))
            await _until(lambda: _watched(router, "w3"))
            assert await _routable(stub, "w3")
        finally:
            replacement.kill()
            await worker.stop()
    finally:
        if process.popen.poll() is None:
            process.kill()


async def test_an_exit_is_named_as_such_when_the_connections_break_first(
        stub: router_pb2_grpc.RouterServiceStub) -> None:
    # Kernels that tear a killed process down within a poll interval close its sockets before the exit
    # watch looks (here: its poll is off). The quarantine still names the exit, which a caller reads.
    running = await serve(RouterConfig(
        host="127.0.0.1", port=0, metrics_port=0, health_probe_interval_s=PROBE_INTERVAL_S,
        health_probe_timeout_s=PROBE_TIMEOUT_S, quarantine_min_s=QUARANTINE_MIN_S, exit_poll_interval_s=0))
    process = _Sleeper()
    try:
        worker = await _started(running, "w4", process.identity)
        process.kill()
        await worker.server.stop(0)  # the dead process's sockets close
        await _until(lambda: running.health is not None and running.health.reason("w4") != "")
        assert running.health is not None and running.health.reason("w4") == "exited"
        assert _sample(running, "tandem_router_workers_quarantined_total", {"reason": "exited"}) == 1
        assert _sample(running, "tandem_router_workers_quarantined_total", {"reason": "unreachable"}) == 0
        await worker.registration.stop()
    finally:
        if process.popen.poll() is None:
            process.kill()
        await running.stop(grace_s=0)


async def test_a_process_on_another_host_is_left_to_the_connection_signals(
        router: RunningRouter, stub: router_pb2_grpc.RouterServiceStub, spare: Worker) -> None:
    # Its PID means nothing here (another host or PID namespace): no exit is inferred from /proc.
    elsewhere = ProcessIdentity("another-boot/pid:[1]", 1, 1)
    worker = await _started(router, "w3", elsewhere)
    try:
        await asyncio.sleep(0.1)
        assert router.health is not None and router.health.reason("w3") == ""
        assert await _routable(stub, "w3")
    finally:
        await worker.stop()
