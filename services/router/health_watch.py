"""Early failure detection in the router: watch every registered worker's gRPC health and take a
failing one out of routing at once (quarantine), before its registration lapses; restore it on SERVING.

Signals: the health ``Watch`` stream turning NOT_SERVING or breaking (connection refused or reset),
a ``Check`` probe that gets no answer within its timeout (a hung or SIGSTOPped process), failure
reports from callers (``ReportWorkerFailure``), and, for a worker on this host, its process exiting
(``tandem.procinfo``: seen within a poll interval of the kill, while the kernel has not yet closed its
sockets). Detection latency is recorded as the time from the worker's last sign of life (a probe
answer, a load report; for an exit, the last poll that found the process running) to its
quarantine: an upper bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.router.exit_watch import ExitWatch
from services.router.registry import WorkerRegistry, WorkerSnapshot
from tandem import procinfo
from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.procinfo import ProcessIdentity, ProcessState

log = structlog.get_logger("router")

# Reasons a worker is quarantined (the metrics' ``reason`` label).
SILENT = "silent"  # a probe went unanswered
UNREACHABLE = "unreachable"  # connection refused or reset
NOT_SERVING = "not_serving"  # the worker said so (loading, draining, engine failed)
EXITED = "exited"  # its process on this host is exiting or gone
REPORTED_PREFIX = "reported_"  # + the caller's failure kind: reported_stalled, reported_unreachable, ...
REASONS = (SILENT, UNREACHABLE, NOT_SERVING, EXITED, "reported_unreachable", "reported_stalled", "reported_stream_broken")
# Quarantines on suspicion: a slow worker looks the same. When they would leave a model with no worker
# at all, routing ignores them (Envoy's "panic mode"): a slow worker beats a 503 for everyone.
SUSPECT_REASONS = frozenset({SILENT, "reported_stalled"})

# Kills are noticed in milliseconds, hangs after the probe timeout (about a second).
_DETECTION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_WATCH_RETRY_S = 0.2


@dataclass(slots=True, frozen=True)
class HealthWatchConfig:
    probe_interval_s: float = 0.5  # how often each worker gets a Check
    probe_timeout_s: float = 1.0  # a Check unanswered this long means the worker is hung
    # A quarantined worker is restored by a SERVING answer to a probe sent at least this long after
    # the quarantine, so one lucky probe cannot undo a fresh failure report.
    min_quarantine_s: float = 1.0
    # How often the processes of workers on this host are checked for exiting; 0 turns it off.
    exit_poll_interval_s: float = 0.02

    def __post_init__(self) -> None:
        for name in ("probe_interval_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid router setting health_{name}: must be > 0, got {getattr(self, name)}")
        if not self.min_quarantine_s >= 0:
            raise ValueError(f"invalid router setting quarantine_min_s: must be >= 0, got {self.min_quarantine_s}")
        if not self.exit_poll_interval_s >= 0:
            raise ValueError("invalid router setting exit_poll_interval_s: must be >= 0, "
                             f"got {self.exit_poll_interval_s}")


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.quarantined = Counter(
            "tandem_router_workers_quarantined", "Workers taken out of routing by failure detection, by signal.",
            ["reason"], registry=registry,
        )
        self.restored = Counter(
            "tandem_router_workers_restored", "Quarantined workers brought back by a SERVING probe.",
            registry=registry,
        )
        self.quarantined_now = Gauge(
            "tandem_router_quarantined_workers", "Registered workers currently out of routing.", registry=registry,
        )
        self.detection = Histogram(
            "tandem_router_failure_detection_seconds",
            "From a worker's last sign of life to its quarantine (an upper bound of detection latency).",
            ["reason"], buckets=_DETECTION_BUCKETS_S, registry=registry,
        )
        self.overridden = Counter(
            "tandem_router_quarantine_overrides",
            "Routing snapshots in which suspect quarantines were ignored because no other worker was left.",
            registry=registry,
        )
        for reason in REASONS:  # export zeros so rate() works before the first failure
            self.quarantined.labels(reason=reason)


@dataclass(slots=True)
class _Quarantine:
    reason: str
    since_s: float


@dataclass(slots=True)
class _Watched:
    address: str
    task: asyncio.Task[None]
    last_alive_s: float
    # The worker's process as registered (its exit is watched when it runs on this host).
    process: ProcessIdentity | None = None
    # Connection failures count only once the worker has answered here at least once: a worker that
    # never did (an advertised address nobody listens on) is left to its registration and to callers.
    contacted: bool = False


def _has_exited(watched: _Watched | None) -> bool:
    """Whether the watched worker's process is on this host and exiting or gone (one /proc read)."""
    process = watched.process if watched is not None else None
    return (process is not None and procinfo.is_local(process)
            and procinfo.probe(process) in (ProcessState.EXITING, ProcessState.GONE))


class WorkerHealthMonitor:
    """Follows ``registry`` (any backend) and probes each worker it lists; single event loop only.

    ``apply`` is called once per routing decision and marks quarantined workers unhealthy; the
    policy's health filter then skips them.
    """

    def __init__(self, registry: WorkerRegistry, metrics: HealthMetrics, config: HealthWatchConfig | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._metrics = metrics
        self._config = config or HealthWatchConfig()
        self._clock = clock
        self._watched: dict[str, _Watched] = {}
        self._quarantined: dict[str, _Quarantine] = {}
        self._sync_task: asyncio.Task[None] | None = None
        self._exit_watch: ExitWatch | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._sync_task is None:
            self._sync_task = asyncio.create_task(self._follow_registry(), name="health-watch")
        if self._exit_watch is None and self._config.exit_poll_interval_s > 0:
            self._exit_watch = ExitWatch(self._config.exit_poll_interval_s, self._exited, asyncio.get_running_loop(),
                                         clock=self._clock)
            self._exit_watch.start()

    async def stop(self) -> None:
        tasks = [watched.task for watched in self._watched.values()]
        if self._sync_task is not None:
            tasks.append(self._sync_task)
            self._sync_task = None
        if self._exit_watch is not None:
            self._exit_watch.stop()
            self._exit_watch = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watched.clear()

    # -- what routing reads ------------------------------------------------------------------

    def apply(self, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        """``workers`` with every quarantined one marked unhealthy, unless only suspects would be left
        of a (role, model): then those are kept (see SUSPECT_REASONS)."""
        if not self._quarantined:
            return list(workers)
        pools: dict[tuple[object, str], list[WorkerSnapshot]] = {}
        for worker in workers:
            pools.setdefault((worker.info.role, worker.info.model), []).append(worker)
        spared: set[str] = set()
        for pool in pools.values():
            if any(w.healthy and w.worker_id not in self._quarantined for w in pool):
                continue
            suspects = [w.worker_id for w in pool if w.healthy and self.reason(w.worker_id) in SUSPECT_REASONS]
            if suspects:
                spared.update(suspects)
                self._metrics.overridden.inc()
        return [dataclasses.replace(worker, healthy=False)
                if worker.worker_id in self._quarantined and worker.worker_id not in spared else worker
                for worker in workers]

    def reason(self, worker_id: str) -> str:
        """Why ``worker_id`` is quarantined; empty when it is not."""
        quarantine = self._quarantined.get(worker_id)
        return quarantine.reason if quarantine else ""

    # -- signals -----------------------------------------------------------------------------

    def note_alive(self, worker_id: str) -> None:
        """A sign of life other than a probe (a load report): only moves the detection baseline."""
        watched = self._watched.get(worker_id)
        if watched is not None:
            watched.last_alive_s = self._clock()

    def _answered(self, worker_id: str) -> None:
        watched = self._watched.get(worker_id)
        if watched is not None:
            watched.contacted = True
            watched.last_alive_s = self._clock()

    def _unanswered(self, worker_id: str, reason: str) -> None:
        watched = self._watched.get(worker_id)
        if watched is not None and watched.contacted:
            self.quarantine(worker_id, reason)

    def report(self, worker_id: str, address: str, kind: str, detected_after_s: float | None = None) -> bool:
        """A caller saw ``worker_id`` fail; False when it is not watched or ``address`` is outdated."""
        watched = self._watched.get(worker_id)
        if watched is None or (address and address != watched.address):
            return False
        self.quarantine(worker_id, REPORTED_PREFIX + kind, detected_after_s)
        return True

    def quarantine(self, worker_id: str, reason: str, detected_after_s: float | None = None) -> None:
        """Take ``worker_id`` out of routing now; a later SERVING probe restores it."""
        now = self._clock()
        current = self._quarantined.get(worker_id)
        if current is not None:
            current.since_s = now  # a fresh failure restarts the hold
            if current.reason in SUSPECT_REASONS and reason not in SUSPECT_REASONS:
                current.reason = reason  # suspicion confirmed: no longer spared when alone
            return
        watched = self._watched.get(worker_id)
        if reason != EXITED and _has_exited(watched):
            # Where a kernel tears a killed process down within a poll interval (a few ms here), its
            # sockets close before the exit watch looks; the cause is still the exit, not the network.
            reason = EXITED
        if detected_after_s is None:
            detected_after_s = now - watched.last_alive_s if watched is not None else 0.0
        self._quarantined[worker_id] = _Quarantine(reason, now)
        self._metrics.quarantined.labels(reason=reason).inc()
        self._metrics.detection.labels(reason=reason).observe(max(0.0, detected_after_s))
        self._metrics.quarantined_now.set(len(self._quarantined))
        log.warning("worker quarantined", worker_id=worker_id, reason=reason,
                    detected_after_ms=round(1000 * detected_after_s, 1))

    def _restore(self, worker_id: str, probe_sent_s: float) -> None:
        quarantine = self._quarantined.get(worker_id)
        if quarantine is None or probe_sent_s < quarantine.since_s + self._config.min_quarantine_s:
            return
        del self._quarantined[worker_id]
        self._metrics.restored.inc()
        self._metrics.quarantined_now.set(len(self._quarantined))
        log.info("worker restored", worker_id=worker_id, was=quarantine.reason,
                 out_for_s=round(self._clock() - quarantine.since_s, 2))

    # -- following the registry --------------------------------------------------------------

    async def _follow_registry(self) -> None:
        """Start a watcher for each new worker and stop those that left, every probe interval."""
        while True:
            self.sync()
            await asyncio.sleep(self._config.probe_interval_s / 2)

    def sync(self) -> None:
        listed = {worker.worker_id: (worker.info.address, worker.info.process) for worker in self._registry.snapshot()}
        for worker_id, watched in list(self._watched.items()):
            address, process = listed.get(worker_id, ("", None))
            if address != watched.address or process != watched.process:
                # left, or re-registered at another address or as another process (a restart)
                watched.task.cancel()
                del self._watched[worker_id]
                if self._quarantined.pop(worker_id, None) is not None:
                    self._metrics.quarantined_now.set(len(self._quarantined))
        for worker_id, (address, process) in listed.items():
            if worker_id not in self._watched:
                task = asyncio.create_task(self._watch(worker_id, address), name=f"health-{worker_id}")
                self._watched[worker_id] = _Watched(address, task, self._clock(), process)
        if self._exit_watch is not None:
            self._exit_watch.watch({worker_id: watched.process for worker_id, watched in self._watched.items()
                                    if watched.process is not None and procinfo.is_local(watched.process)})

    def _exited(self, worker_id: str, process: ProcessIdentity, silent_s: float) -> None:
        """The exit watch saw ``worker_id``'s process exiting or gone (on the event loop)."""
        watched = self._watched.get(worker_id)
        if watched is not None and watched.process == process:
            self.quarantine(worker_id, EXITED, silent_s)

    async def _watch(self, worker_id: str, address: str) -> None:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await asyncio.gather(self._follow_watch(worker_id, stub), self._probe(worker_id, stub))

    async def _follow_watch(self, worker_id: str, stub: health_pb2_grpc.HealthStub) -> None:
        """The pushed signals: NOT_SERVING, or the stream breaking when the process dies."""
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    self._answered(worker_id)
                    if reply.status != health_pb2.HealthCheckResponse.SERVING:
                        self.quarantine(worker_id, NOT_SERVING)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._unanswered(worker_id, UNREACHABLE)
                elif error.code() != grpc.StatusCode.CANCELLED:
                    log.info("health watch failed", worker_id=worker_id, code=error.code().name)
            await asyncio.sleep(_WATCH_RETRY_S)

    async def _probe(self, worker_id: str, stub: health_pb2_grpc.HealthStub) -> None:
        """The pulled signal: a Check must be answered within the timeout, or the worker is hung."""
        config = self._config
        while True:
            sent_s = self._clock()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=config.probe_timeout_s)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._unanswered(worker_id, SILENT)
                elif error.code() == grpc.StatusCode.UNAVAILABLE:
                    self._unanswered(worker_id, UNREACHABLE)
            else:
                self._answered(worker_id)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    self._restore(worker_id, sent_s)
                else:
                    self.quarantine(worker_id, NOT_SERVING)
            await asyncio.sleep(max(0.0, config.probe_interval_s - (self._clock() - sent_s)))
