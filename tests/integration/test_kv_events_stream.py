"""KV events over the registration stream, with a fake engine (no model): a real decode worker and a
real router in one process, on port 0. Snapshot on registering, events, a gap and its resync,
request progress, and the blocks leaving with the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker, serve
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router
from tandem.engine.config import EngineConfig
from tandem.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput, StepInfo
from tandem.kv.events import KvEventLog, KvSnapshot, KvSubscription
from tandem.kv.hashing import hash_blocks
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

PROMPT = list(range(100, 164))  # 4 blocks of 16


class KvEngine:
    """Stores a request's prompt blocks when it starts, like a real pool, through a real KvEventLog."""

    model_name = "fake-model"
    max_model_len = 256

    def __init__(self, config: EngineConfig, on_step: Callable[[StepInfo], None] | None) -> None:
        self.events = KvEventLog()
        self.release = asyncio.Event()

    async def start(self) -> None:
        self.events.record("stored", [11, 12])  # cached before the router ever heard of us

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.events.record("stored", hash_blocks(request.prompt_token_ids, 16))
        yield RequestOutput(request.request_id, [7], "a", num_prompt_tokens=len(request.prompt_token_ids),
                            num_output_tokens=1)
        await self.release.wait()
        yield RequestOutput(request.request_id, [8], "b", FinishReason.STOP, len(request.prompt_token_ids), 2)

    def kv_events(self) -> KvSubscription:
        return self.events.subscribe()

    def kv_snapshot(self) -> KvSnapshot:
        return self.events.snapshot()

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_kv_blocks_total=64, num_free_queue_slots=4)

    def healthy(self) -> bool:
        return True

    async def shutdown(self) -> None:
        pass


async def _eventually(condition: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0, policy="kv"))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def worker(tmp_path: Path, router: RunningRouter) -> AsyncIterator[DecodeWorker]:
    (tmp_path / "config.json").write_text("{}")
    config = DecodeConfig(host="127.0.0.1", port=0, metrics_port=0, router_address=router.address,
                          worker_id="w1", model=str(tmp_path))
    running = await serve(config, engine_factory=KvEngine)
    assert running.registration is not None
    await running.registration.wait_registered(10)
    yield running
    await running.stop(drain_timeout_s=0)


def _metric(router: RunningRouter, name: str) -> float:
    return router.metrics.registry.get_sample_value(name) or 0.0


async def test_events_snapshots_gaps_and_progress_reach_the_router(router: RunningRouter,
                                                                   worker: DecodeWorker) -> None:
    kv = router.kv_feed.kv
    engine = worker.engine
    assert isinstance(engine, KvEngine)
    # Registering sends a snapshot: blocks cached before the router knew the worker are known.
    await _eventually(lambda: kv.index.overlaps([11, 12], ["w1"]) == {"w1": 2}, "the registration snapshot")

    # Route and run a request: its blocks arrive as events, its progress releases its load.
    async with grpc.aio.insecure_channel(router.address) as router_channel, \
            grpc.aio.insecure_channel(worker.address) as worker_channel:
        route = await router_pb2_grpc.RouterServiceStub(router_channel).Route(
            router_pb2.RouteRequest(request_id="r1", token_ids=PROMPT))
        assert route.worker_id == "w1" and len(kv.tracker) == 1
        call = worker_pb2_grpc.WorkerServiceStub(worker_channel).Generate(
            worker_pb2.GenerateRequest(request_id="r1", prompt_token_ids=PROMPT,
                                       sampling=common_pb2.SamplingParams(max_tokens=2)))
        first = await call.read()
        assert list(first.delta.token_ids) == [7]
        await _eventually(lambda: kv.index.overlaps(hash_blocks(PROMPT, 16), ["w1"]) == {"w1": 4}, "events")
        await _eventually(lambda: kv.tracker.prefill_tokens("w1") == 0, "the first-token notice")
        engine.release.set()
        while await call.read() is not grpc.aio.EOF:
            pass
    await _eventually(lambda: len(kv.tracker) == 0, "the finish notice")
    assert _metric(router, "tandem_router_kv_events_applied_total") >= 1

    # A lost event: the router sees the next id skip, asks for a snapshot and ends up exact.
    engine.events._last_event_id += 1  # an event the stream never carried
    engine.events._cached.add(99)
    engine.events.record("removed", [11])
    await _eventually(lambda: _metric(router, "tandem_router_kv_resyncs_total") >= 2, "a resync")
    assert _metric(router, "tandem_router_kv_event_gaps_total") == 1
    assert kv.index.overlaps([99], ["w1"]) == {"w1": 1}
    assert kv.index.overlaps([11], ["w1"]) == {"w1": 0}

    # The worker leaves: its blocks leave the index with it.
    await worker.registration.stop()  # type: ignore[union-attr]
    await _eventually(lambda: kv.index.num_blocks == 0, "the blocks to be dropped")
