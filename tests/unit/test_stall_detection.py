"""The frontend's stall detection over scripted calls: which reads end, how, and which go on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.frontend.failure_detection import (
    STALLED,
    WORKER_STALLED,
    FailoverMetrics,
    StallDetector,
    StreamWatches,
    WorkerStreamBroken,
)

pytestmark = pytest.mark.unit


class ScriptedCall:
    """A worker call whose next message comes when the test says; a cancelled read cancels it, as grpc's does."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self.cancelled = False

    async def read(self) -> str:
        try:
            return await self.messages.get()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Detector(StallDetector):
    """Health checks answered from ``alive`` (by address, default SERVING) instead of over gRPC."""

    def __init__(self, stall_timeout_s: float, first_token_timeout_s: float | None = None) -> None:
        self.metrics = FailoverMetrics(CollectorRegistry())
        super().__init__(StreamWatches(stall_timeout_s, first_token_timeout_s), self.metrics,
                         lambda address: None, confirm_timeout_s=1.0)  # type: ignore[arg-type,return-value]
        self.alive: dict[str, bool] = {}
        self.checks: list[str] = []

    async def _check(self, address: str) -> bool:
        self.checks.append(address)
        await asyncio.sleep(0.01)  # a health check's round trip: streams whose limits run out meanwhile share it
        return self.alive.get(address, True)

    def false_alarms(self) -> float:
        return self.metrics.stall_false_alarms._value.get()


async def _read(detector: StallDetector, call: ScriptedCall, watch: Any) -> Any:
    """A read after the first token: the stall limit applies."""
    return await detector.read(call, watch, started=True)


async def test_a_hung_worker_loses_every_stream_on_it_and_no_other() -> None:
    detector = Detector(stall_timeout_s=0.05)
    detector.alive["w1"] = False
    first, second, elsewhere = ScriptedCall(), ScriptedCall(), ScriptedCall()
    watches = [detector.open(address) for address in ("w1", "w1", "w2")]
    reads = [asyncio.ensure_future(_read(detector, call, watch))
             for call, watch in zip((first, second, elsewhere), watches, strict=True)]
    done, _ = await asyncio.wait(reads[:2], timeout=2)
    assert len(done) == 2
    kinds = sorted(read.exception().kind for read in reads[:2])  # type: ignore[union-attr]
    assert kinds == [STALLED, WORKER_STALLED]  # one stream's silence condemned the worker, the other moved with it
    assert first.cancelled and second.cancelled  # the abandoned calls are cancelled
    assert detector.checks.count("w1") == 1  # one health check for the worker, not one per stream
    elsewhere.messages.put_nowait("t0")  # w2 answers its health checks: its stream only waited
    assert await asyncio.wait_for(reads[2], 2) == "t0" and not elsewhere.cancelled
    for watch in watches:
        detector.close(watch)


async def test_a_slow_worker_that_answers_keeps_its_stream() -> None:
    detector = Detector(stall_timeout_s=0.03)
    call, watch = ScriptedCall(), detector.open("w1")
    read = asyncio.ensure_future(_read(detector, call, watch))
    await asyncio.sleep(0.15)
    assert not read.done() and detector.false_alarms() >= 2  # checked each time its limit ran out, kept
    call.messages.put_nowait("late")
    assert await read == "late" and not call.cancelled
    detector.close(watch)


async def test_a_stream_condemned_between_reads_fails_its_next_read() -> None:
    detector = Detector(stall_timeout_s=0.05)
    detector.alive["w1"] = False
    hung, busy = ScriptedCall(), ScriptedCall()
    hung_watch, busy_watch = detector.open("w1"), detector.open("w1")
    with pytest.raises(WorkerStreamBroken) as broken:
        await _read(detector, hung, hung_watch)
    assert broken.value.kind == STALLED and "1 other streams on the worker move too" in str(broken)
    busy.messages.put_nowait("queued")  # the busy stream was not reading when its worker was condemned
    with pytest.raises(WorkerStreamBroken) as moved:
        await _read(detector, busy, busy_watch)
    assert moved.value.kind == WORKER_STALLED


async def test_the_stall_limit_starts_with_the_first_token() -> None:
    detector = Detector(stall_timeout_s=0.03)  # no first-token limit: a long prefill is not a stall
    detector.alive["w1"] = False
    call, watch = ScriptedCall(), detector.open("w1")
    first = asyncio.ensure_future(detector.read(call, watch, started=False))
    await asyncio.sleep(0.1)
    assert not first.done() and detector.checks == []
    call.messages.put_nowait("t0")
    assert await first == "t0"
    with pytest.raises(WorkerStreamBroken):
        await asyncio.wait_for(detector.read(call, watch, started=True), 2)


async def test_a_client_leaving_is_a_cancellation_not_a_stall() -> None:
    detector = Detector(stall_timeout_s=10)
    call, watch = ScriptedCall(), detector.open("w1")
    read = asyncio.ensure_future(_read(detector, call, watch))
    await asyncio.sleep(0.01)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    assert call.cancelled and detector.checks == []
    detector.close(watch)
    assert watch.timer is None
