"""Route prediction: with the model's only worker known, requests start there while their Route is on its way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.frontend import route_client
from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import SamplingParams
from tandem.errors import Unavailable
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.test_frontend_pipeline import (
    MODEL,
    FakeRouter,
    FakeTokenizer,
    FakeWorker,
    _collect,
    _start,
)

pytestmark = pytest.mark.integration


@dataclass
class ScriptedRouter(FakeRouter):
    """FakeRouter that says whether its answer is the only candidate, and can hold or refuse answers."""

    only_candidate: bool = True
    answer_worker: str | None = None  # name this worker instead of the first one not excluded
    refuse: bool = False
    prefill: worker_pb2.PrefillHint | None = None  # a remote prefill in every answer
    held: asyncio.Event = field(default_factory=asyncio.Event)  # answers wait while this is clear
    answered: int = 0

    def __post_init__(self) -> None:
        self.held.set()

    async def Route(self, request, context):  # noqa: N802
        self.requests.append(request)
        await self.held.wait()
        self.answered += 1
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker (scripted)")
        candidates = [(w, a) for w, a in self.workers if w not in request.exclude_worker_ids]
        if self.answer_worker is not None:
            candidates = [(w, a) for w, a in self.workers if w == self.answer_worker]
        if not candidates:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker")
        worker_id, address = candidates[0]
        only = (self.only_candidate and not request.exclude_worker_ids and not request.HasField("overrides")
                and self.prefill is None)
        return router_pb2.RouteResponse(worker_id=worker_id, address=address, only_candidate=only,
                                        prefill=self.prefill)


@dataclass
class Mesh:
    router: ScriptedRouter
    worker: FakeWorker
    pipeline: Pipeline
    servers: list[grpc.aio.Server]

    def count(self, decision: str) -> float:
        return self.pipeline.metrics.registry.get_sample_value(
            "tandem_frontend_routes_total", {"model": MODEL, "decision": decision}) or 0.0

    def mispredictions(self) -> float:
        return self.pipeline.metrics.registry.get_sample_value(
            "tandem_frontend_route_mispredictions_total", {"model": MODEL}) or 0.0


async def _mesh(predict_routes: bool = True) -> tuple[Mesh, Callable[[], object]]:
    worker = FakeWorker()
    worker_server, worker_address = await _start(worker, worker_pb2_grpc.add_WorkerServiceServicer_to_server)
    router = ScriptedRouter([("w1", worker_address)])
    router_server, router_address = await _start(router, router_pb2_grpc.add_RouterServiceServicer_to_server)
    pipeline = Pipeline(model_name=MODEL, max_model_len=64, tokenizer=FakeTokenizer(), router_address=router_address,
                        metrics=FrontendMetrics(CollectorRegistry()), predict_routes=predict_routes)

    async def close() -> None:
        router.held.set()
        await pipeline.close()
        for server in (worker_server, router_server):
            await server.stop(0)

    return Mesh(router, worker, pipeline, [worker_server, router_server]), close


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    built, close = await _mesh()
    yield built
    await close()  # type: ignore[misc]


def _request(request_id: str, **fields: object) -> GenerationRequest:
    return GenerationRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=3), "completions", True,
                             **fields)  # type: ignore[arg-type]


async def _eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "condition not met within 5 s"
        await asyncio.sleep(0.01)


async def test_a_request_runs_on_the_only_worker_while_its_route_is_unanswered(mesh: Mesh) -> None:
    first = await _collect(mesh.pipeline, _request("r1"))  # asked: the answer says w1 is the only one
    assert first[-1].finished and mesh.count("asked") == 1
    mesh.router.held.clear()  # the router takes its time with every answer from now on
    second = await asyncio.wait_for(_collect(mesh.pipeline, _request("r2")), 5)
    assert [o.text for o in second] == ["t0", "t1", "t2"]
    # r2 streamed all its tokens before its Route was answered (or even sent); the router gets it all the same.
    await _eventually(lambda: len(mesh.router.requests) == 2)
    assert mesh.router.answered == 1 and [r.request_id for r in mesh.router.requests] == ["r1", "r2"]
    assert mesh.worker.request_ids == ["r1", "r2"]
    mesh.router.held.set()
    await _eventually(lambda: mesh.router.answered == 2)
    await _collect(mesh.pipeline, _request("r3"))
    assert (mesh.count("asked"), mesh.count("predicted"), mesh.mispredictions()) == (1, 2, 0)


async def test_an_answer_that_is_no_longer_the_only_candidate_stops_predicting(mesh: Mesh) -> None:
    await _collect(mesh.pipeline, _request("r1"))
    mesh.router.only_candidate = False  # a second worker registered
    await _collect(mesh.pipeline, _request("r2"))  # predicted; its answer says "not the only one"
    await _eventually(lambda: mesh.router.answered == 2)
    mesh.router.held.clear()
    third = asyncio.ensure_future(_collect(mesh.pipeline, _request("r3")))
    await _eventually(lambda: len(mesh.router.requests) == 3)
    await asyncio.sleep(0.1)
    assert not third.done() and mesh.worker.request_ids == ["r1", "r2"]  # r3 waits for its answer
    mesh.router.held.set()
    assert (await third)[-1].finished
    assert (mesh.count("asked"), mesh.count("predicted"), mesh.mispredictions()) == (2, 1, 0)


async def test_an_answer_naming_another_worker_counts_as_mispredicted_and_stops_predicting(mesh: Mesh) -> None:
    await _collect(mesh.pipeline, _request("r1"))
    mesh.router.workers.append(("w2", mesh.router.workers[0][1]))
    mesh.router.answer_worker = "w2"
    outputs = await _collect(mesh.pipeline, _request("r2"))  # stays on w1, where it started
    assert outputs[-1].finished
    await _eventually(lambda: mesh.mispredictions() == 1)
    await _collect(mesh.pipeline, _request("r3"))
    assert (mesh.count("asked"), mesh.count("predicted")) == (2, 1)


async def test_an_answer_wanting_remote_prefill_counts_as_mispredicted(mesh: Mesh) -> None:
    await _collect(mesh.pipeline, _request("r1"))
    # A prefill worker registered: the router would have sent this prompt to it, not prefilled it here.
    mesh.router.prefill = worker_pb2.PrefillHint(worker_id="p1", address="127.0.0.1:1", min_remote_prefill_tokens=1)
    assert (await _collect(mesh.pipeline, _request("r2")))[-1].finished
    await _eventually(lambda: mesh.mispredictions() == 1)
    await _collect(mesh.pipeline, _request("r3"))  # asked, and sent on with the router's prefill hint
    assert (mesh.count("asked"), mesh.count("predicted")) == (2, 1)


async def test_a_failed_route_check_stops_predicting_and_its_request_still_finishes(mesh: Mesh) -> None:
    await _collect(mesh.pipeline, _request("r1"))
    mesh.router.refuse = True
    outputs = await _collect(mesh.pipeline, _request("r2"))
    assert [o.text for o in outputs] == ["t0", "t1", "t2"]
    await _eventually(lambda: mesh.mispredictions() == 1)
    with pytest.raises(Unavailable, match="no healthy worker"):  # asked again, and refused
        await _collect(mesh.pipeline, _request("r3"))
    assert mesh.count("predicted") == 1


async def test_a_worker_failure_stops_predicting_even_when_an_older_answer_comes_later(mesh: Mesh) -> None:
    await _collect(mesh.pipeline, _request("r1"))
    mesh.router.held.clear()
    mesh.worker.fail_before = grpc.StatusCode.UNAVAILABLE
    failing = asyncio.ensure_future(_collect(mesh.pipeline, _request("r2")))  # predicted onto w1, which fails
    await _eventually(lambda: len(mesh.router.requests) == 3)  # the check and the re-route excluding w1
    assert sorted(list(r.exclude_worker_ids) for r in mesh.router.requests[1:]) == [[], ["w1"]]
    mesh.worker.fail_before = None
    mesh.router.held.set()  # the check's answer (only_candidate, sent before the failure) arrives now
    with pytest.raises(Unavailable):
        await failing
    await _eventually(lambda: mesh.router.answered == 3)
    await _collect(mesh.pipeline, _request("r3"))
    assert (mesh.count("asked"), mesh.count("predicted")) == (2, 1)  # r3 asked: the stale answer did not count


async def test_overrides_and_a_frontend_without_prediction_always_ask() -> None:
    built, close = await _mesh(predict_routes=False)
    try:
        for i in range(3):
            await _collect(built.pipeline, _request(f"r{i}"))
        assert (built.count("asked"), built.count("predicted")) == (3, 0)
    finally:
        await close()  # type: ignore[misc]
    built, close = await _mesh()
    try:
        await _collect(built.pipeline, _request("r0"))
        overrides = router_pb2.RoutingOverrides(kv_overlap_weight=2.0)
        await _collect(built.pipeline, _request("r1", routing=overrides))
        assert (built.count("asked"), built.count("predicted")) == (2, 0)
        assert built.router.requests[1].HasField("overrides")
    finally:
        await close()  # type: ignore[misc]


async def test_a_bursts_route_checks_go_out_after_its_requests_reached_the_worker(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_client, "CHECK_QUIET_S", 0.3)  # longer than the burst's intake on any host
    await _collect(mesh.pipeline, _request("r0"))  # asked: w1 is the only candidate
    mesh.worker.delay_s = 0.05
    burst = asyncio.ensure_future(asyncio.gather(*(_collect(mesh.pipeline, _request(f"b{i}")) for i in range(4))))
    await _eventually(lambda: len(mesh.worker.request_ids) == 5)
    # Every request of the burst is at the worker, and none of its Routes took the loop before that.
    assert [r.request_id for r in mesh.router.requests] == ["r0"]
    for outputs in await burst:
        assert [o.text for o in outputs] == ["t0", "t1", "t2"]
    await _eventually(lambda: mesh.router.answered == 5)  # the router counts every one all the same
    assert sorted(r.request_id for r in mesh.router.requests[1:]) == ["b0", "b1", "b2", "b3"]
    assert (mesh.count("asked"), mesh.count("predicted"), mesh.mispredictions()) == (1, 4, 0)


async def test_route_checks_wait_at_most_their_limit_under_steady_arrivals(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_client, "CHECK_QUIET_S", 0.2)
    monkeypatch.setattr(route_client, "CHECK_MAX_DELAY_S", 0.1)
    await _collect(mesh.pipeline, _request("r0"))
    running = []
    started = time.monotonic()
    while time.monotonic() - started < 0.6:  # a request every 20 ms: never quiet for 0.2 s
        running.append(asyncio.ensure_future(_collect(mesh.pipeline, _request(f"s{len(running)}"))))
        await asyncio.sleep(0.02)
    # The first checks went out once the oldest had waited 0.1 s, while requests kept coming.
    assert len(mesh.router.requests) > 1
    await asyncio.gather(*running)
    await _eventually(lambda: mesh.router.answered == 1 + len(running))
    assert mesh.count("predicted") == len(running) and mesh.mispredictions() == 0

