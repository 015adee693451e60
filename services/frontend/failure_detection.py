"""How the frontend notices a failing worker mid-stream and tells the router, plus the metrics of
migration and overload.

A stream stalls when no message arrives for ``stall_timeout_s`` after its first token (or
``first_token_timeout_s`` before it) and its worker then fails a health check too (a slow worker that
answers keeps its streams). A stall condemns the worker, not only the request: every other stream open
on the same worker is migrated at once rather than each waiting out its own timer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

log = structlog.get_logger(__name__)

# Failure kinds: the label of the migration metrics and what is reported to the router.
UNREACHABLE = "unreachable"  # UNAVAILABLE: connection refused or reset, worker gone
STREAM_BROKEN = "stream_broken"  # cancelled by the worker, or ended before the request finished
STALLED = "stalled"  # this stream's timer ran out
WORKER_STALLED = "worker_stalled"  # another stream on the same worker stalled
KINDS = (UNREACHABLE, STREAM_BROKEN, STALLED, WORKER_STALLED)
_KIND_TO_PROTO = {
    UNREACHABLE: router_pb2.WORKER_FAILURE_KIND_UNREACHABLE,
    STREAM_BROKEN: router_pb2.WORKER_FAILURE_KIND_STREAM_BROKEN,
    STALLED: router_pb2.WORKER_FAILURE_KIND_STALLED,
}
_REPORT_TIMEOUT_S = 1.0
_DETECTION_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class WorkerStreamBroken(Exception):
    """The worker failed the request in a way another worker can fix: the request migrates."""

    def __init__(self, message: str, kind: str, detected_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.kind = kind  # one of KINDS
        self.detected_after_s = detected_after_s  # silence on the stream before the failure showed


class FailoverMetrics:
    """Registered beside FrontendMetrics on the same registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.migrations = Counter(
            "tandem_frontend_migrations", "Requests resubmitted to another worker after a failure, by reason.",
            ["model", "reason"], registry=registry,
        )
        self.migration_failures = Counter(
            "tandem_frontend_migration_failures",
            "Requests that ended with an error because they could not move (limit reached, no healthy worker).",
            ["model"], registry=registry,
        )
        self.detection = Histogram(
            "tandem_frontend_failure_detection_seconds",
            "From the last message on a worker stream to the frontend declaring the worker failed.",
            ["kind"], buckets=_DETECTION_BUCKETS_S, registry=registry,
        )
        self.stall_false_alarms = Counter(
            "tandem_frontend_stall_false_alarms",
            "Streams silent past the stall limit whose worker still answered a health check (slow, kept).",
            registry=registry,
        )
        self.rejected_overload = Counter(
            "tandem_frontend_requests_rejected_overload",
            "Requests answered 503 / RESOURCE_EXHAUSTED because the frontend queue or every worker was full.",
            ["model", "reason"], registry=registry,
        )
        self.queued = Gauge(
            "tandem_frontend_queued_requests", "Requests waiting for a slot in the frontend's bounded queue.",
            registry=registry,
        )


@dataclass(eq=False)
class StreamWatch:
    """One worker stream's watch: when its read began and its last message came, and whether its
    worker was condemned (then its read is interrupted, or the next one refused)."""

    address: str
    started_s: float = field(default_factory=time.monotonic)
    last_message_s: float = 0.0
    reading_since_s: float = 0.0
    started: bool = False  # a token came: the stall limit applies, not the first-token one
    reader: asyncio.Task[Any] | None = None  # the task waiting in the call's read, while it waits there
    timer: asyncio.TimerHandle | None = None
    condemned: WorkerStreamBroken | None = None
    closed: bool = False

    def __post_init__(self) -> None:
        self.last_message_s = self.reading_since_s = self.started_s

    def silent_for_s(self) -> float:
        return time.monotonic() - self.last_message_s


class StreamWatches:
    """Every open worker stream of the frontend, by worker address, so that a stall on one stops all."""

    def __init__(self, stall_timeout_s: float | None, first_token_timeout_s: float | None) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self._by_address: dict[str, set[StreamWatch]] = {}

    def open(self, address: str) -> StreamWatch:
        watch = StreamWatch(address)
        self._by_address.setdefault(address, set()).add(watch)
        return watch

    def close(self, watch: StreamWatch) -> None:
        watch.closed = True
        watches = self._by_address.get(watch.address)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._by_address[watch.address]

    def limit_s(self, started: bool) -> float | None:
        """Longest silence allowed now: the stall limit once tokens flow, the first-token limit before."""
        return self.stall_timeout_s if started else self.first_token_timeout_s

    def others(self, address: str, cause: StreamWatch) -> list[StreamWatch]:
        """The streams open on ``address`` besides ``cause`` and not yet condemned."""
        return [watch for watch in self._by_address.get(address, ()) if watch is not cause and not watch.condemned]


class StallDetector:
    """Watches worker streams for stalls. A read waits on the call itself (no task, timeout or shield
    of its own: those cost ~35 us a message on the frontend's loop); one timer a stream looks at it
    once its limit could have run out. A read silent past the limit moves the stream only if its
    worker also fails a health check within ``confirm_timeout_s`` (the read goes on meanwhile): a live
    process answers in milliseconds even when its engine is slow, and a slow worker keeps its streams.
    A worker that fails it is condemned: every stream on it is interrupted and migrates."""

    def __init__(self, watches: StreamWatches, metrics: FailoverMetrics,
                 channel_for: Callable[[str], grpc.aio.Channel], confirm_timeout_s: float) -> None:
        self._watches = watches
        self._metrics = metrics
        self._channel_for = channel_for
        self._confirm_timeout_s = confirm_timeout_s
        self._probes: dict[str, asyncio.Future[bool]] = {}
        self._confirmations: set[asyncio.Task[None]] = set()

    def open(self, address: str) -> StreamWatch:
        watch = self._watches.open(address)
        self._arm(watch, self._watches.limit_s(started=False))
        return watch

    def close(self, watch: StreamWatch) -> None:
        self._watches.close(watch)
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None

    async def read(self, call: Any, watch: StreamWatch, *, started: bool) -> Any:
        """The call's next response; raises WorkerStreamBroken when the worker is found hung."""
        if watch.condemned is not None:
            raise watch.condemned
        if started and not watch.started:  # the first token came: the stall limit from now on
            watch.started = True
            self._arm(watch, self._watches.limit_s(started=True))
        watch.reading_since_s = time.monotonic()
        task = watch.reader = asyncio.current_task()
        try:
            response = await call.read()
        except asyncio.CancelledError:
            # Interrupted because the worker was condemned (which cancels the call: it is abandoned),
            # unless this task was also cancelled for its own reasons (the client left).
            if watch.condemned is None or task is None or task.uncancel() > 0:
                raise
            raise watch.condemned from None
        finally:
            watch.reader = None
        watch.last_message_s = time.monotonic()
        return response

    def _arm(self, watch: StreamWatch, delay_s: float | None) -> None:
        if watch.timer is not None:
            watch.timer.cancel()
            watch.timer = None
        if delay_s is not None and not watch.closed and watch.condemned is None:
            watch.timer = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._look, watch)

    def _look(self, watch: StreamWatch) -> None:
        """The timer of ``watch``: a read still waiting past its limit gets its worker checked."""
        watch.timer = None
        limit_s = self._watches.limit_s(watch.started)
        if limit_s is None or watch.closed or watch.condemned is not None:
            return
        waited_s = time.monotonic() - watch.reading_since_s
        if watch.reader is None or waited_s < limit_s:  # not waiting on the worker, or not for long
            self._arm(watch, limit_s - waited_s if watch.reader is not None else limit_s)
            return
        confirmation = asyncio.ensure_future(self._confirm(watch, limit_s))
        self._confirmations.add(confirmation)
        confirmation.add_done_callback(self._confirmations.discard)

    async def _confirm(self, watch: StreamWatch, limit_s: float) -> None:
        last_message_s = watch.last_message_s
        alive = await self._answers(watch.address)
        if watch.closed or watch.condemned is not None:
            return
        if alive or watch.last_message_s != last_message_s:  # slow but alive, or a message came meanwhile
            if alive:
                self._metrics.stall_false_alarms.inc()
                log.info("worker slow but alive; the stream stays", address=watch.address,
                         silent_for_s=round(watch.silent_for_s(), 2))
            self._arm(watch, limit_s)
            return
        silent_for_s = watch.silent_for_s()
        others = self._watches.others(watch.address, watch)
        for other in others:
            self._condemn(other, WorkerStreamBroken("another stream on this worker stalled", WORKER_STALLED,
                                                    other.silent_for_s()))
        self._condemn(watch, WorkerStreamBroken(
            f"no token for {silent_for_s:.1f} s and no answer to a health check; {len(others)} other "
            "streams on the worker move too", STALLED, silent_for_s))

    def _condemn(self, watch: StreamWatch, broken: WorkerStreamBroken) -> None:
        watch.condemned = broken
        self._arm(watch, None)
        if watch.reader is not None:  # waiting in its read: interrupted; otherwise its next read raises
            watch.reader.cancel()

    async def _answers(self, address: str) -> bool:
        """Whether the worker answers a health check SERVING; one check per worker at a time."""
        probe = self._probes.get(address)
        if probe is None:
            probe = asyncio.ensure_future(self._check(address))
            self._probes[address] = probe
            probe.add_done_callback(lambda _: self._probes.pop(address, None))
        return await asyncio.shield(probe)

    async def _check(self, address: str) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel_for(address)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._confirm_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class FailureReporter:
    """Tells the router about a failed worker without holding up the migration (fire and forget)."""

    def __init__(self, router: router_pb2_grpc.RouterServiceStub) -> None:
        self._router = router
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self, worker_id: str, address: str, kind: str, detected_after_s: float, detail: str) -> None:
        proto_kind = _KIND_TO_PROTO.get(kind)
        if proto_kind is None:
            return  # WORKER_STALLED: the stream that stalled first has reported it
        task = asyncio.create_task(self._send(router_pb2.ReportWorkerFailureRequest(
            worker_id=worker_id, address=address, kind=proto_kind, detected_after_s=detected_after_s,
            detail=detail[:500],
        )))
        self._tasks.add(task)  # keep a reference until done, or the task may be collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def _send(self, message: router_pb2.ReportWorkerFailureRequest) -> None:
        try:
            await self._router.ReportWorkerFailure(message, timeout=_REPORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            # The router may be down or older than this RPC; its own health watch will notice anyway.
            log.info("could not report worker failure", worker_id=message.worker_id, code=error.code().name)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
