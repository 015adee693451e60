"""The RouterService gRPC handlers: Route, RegisterWorker (the embedded registry's stream), ListWorkers,
ReportWorkerFailure."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc
import structlog

from services.router.disagg import PrefillSelector
from services.router.health_watch import WorkerHealthMonitor
from services.router.kv_feed import KvFeed
from services.router.metrics import RouterMetrics
from services.router.policy import ModelFilter, NoWorkerAvailable, RoleFilter, RouteContext, RoutingPolicy
from services.router.registry import (
    EmbeddedRegistry,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistry,
    WorkerRole,
    WorkerSnapshot,
)
from tandem.errors import InvalidRequest
from tandem.grpc_server import bind_request_id, request_id_from_context
from tandem.procinfo import ProcessIdentity, process_to_proto
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2

log = structlog.get_logger("router")

_ROLES = {router_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE, router_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL}
_ROLES_TO_PROTO = {role: number for number, role in _ROLES.items()}
_FAILURE_KINDS = {
    router_pb2.WORKER_FAILURE_KIND_UNREACHABLE: "unreachable",
    router_pb2.WORKER_FAILURE_KIND_STALLED: "stalled",
    router_pb2.WORKER_FAILURE_KIND_STREAM_BROKEN: "stream_broken",
}


def info_from_proto(message: router_pb2.WorkerInfo) -> WorkerInfo:
    """Validate a registration; raises ``InvalidRequest`` naming the field at fault."""
    if not message.worker_id:
        raise InvalidRequest("register.worker_id: must not be empty", "register.worker_id")
    if message.role not in _ROLES:
        raise InvalidRequest("register.role: must be WORKER_ROLE_DECODE or WORKER_ROLE_PREFILL", "register.role")
    host, _, port = message.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidRequest(f"register.address: must be host:port, got {message.address!r}", "register.address")
    if not message.model:
        raise InvalidRequest("register.model: must name the served model", "register.model")
    process = None
    if message.HasField("process"):
        process = ProcessIdentity(message.process.pid_namespace, message.process.pid, message.process.start_ticks)
    return WorkerInfo(
        worker_id=message.worker_id, role=_ROLES[message.role], address=message.address,
        model=message.model, max_model_len=message.max_model_len, block_size=message.block_size, process=process,
    )


def load_from_proto(message: worker_pb2.WorkerLoad) -> WorkerLoad:
    return WorkerLoad(
        num_running=message.num_running, num_waiting=message.num_waiting,
        num_kv_blocks_used=message.num_kv_blocks_used, num_kv_blocks_total=message.num_kv_blocks_total,
        num_free_queue_slots=message.num_free_queue_slots,
    )


def _info_to_proto(info: WorkerInfo) -> router_pb2.WorkerInfo:
    message = router_pb2.WorkerInfo(
        worker_id=info.worker_id, role=_ROLES_TO_PROTO[info.role], address=info.address,  # type: ignore[arg-type]
        model=info.model, max_model_len=info.max_model_len, block_size=info.block_size,
    )
    if info.process is not None:
        message.process.CopyFrom(process_to_proto(info.process))
    return message


def _load_to_proto(load: WorkerLoad) -> worker_pb2.WorkerLoad:
    return worker_pb2.WorkerLoad(
        num_running=load.num_running, num_waiting=load.num_waiting,
        num_kv_blocks_used=load.num_kv_blocks_used, num_kv_blocks_total=load.num_kv_blocks_total,
        num_free_queue_slots=load.num_free_queue_slots,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, registry: EmbeddedRegistry, policy: RoutingPolicy, metrics: RouterMetrics,
                 kv_feed: KvFeed | None = None, *, health: WorkerHealthMonitor | None = None,
                 catalogue: WorkerRegistry | None = None, prefill: PrefillSelector | None = None) -> None:
        self._registry = registry
        self._prefill = prefill  # None: never disaggregate
        self._policy = policy
        self._metrics = metrics
        self._kv_feed = kv_feed
        self._health = health
        # Set when another backend (Consul) lists the workers; RegisterWorker streams are then refused.
        self._catalogue = catalogue
        # Set on shutdown: registration streams never end on their own, so they are ended here
        # rather than holding the server for its whole grace period.
        self._closing = asyncio.Event()
        self._route_inboxes: set[asyncio.Queue[router_pb2.RouteStreamRequest | None]] = set()  # open RouteStreams

    def close_streams(self) -> None:
        self._closing.set()
        for inbox in self._route_inboxes:
            inbox.put_nowait(None)

    async def Route(  # noqa: N802 (gRPC method name)
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        try:
            return self._decide(request, request.request_id or request_id_from_context(context) or "")
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
        except NoWorkerAvailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, error.message)
        raise AssertionError("unreachable: context.abort raises")

    async def RouteStream(  # noqa: N802
        self, request_iterator: AsyncIterator[router_pb2.RouteStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouteStreamResponse]:
        # Callers keep the stream open for good, so shutdown must be able to end it: requests pass
        # through an inbox that close_streams() ends (a cancelled handler would not end the call).
        inbox: asyncio.Queue[router_pb2.RouteStreamRequest | None] = asyncio.Queue()

        async def receive() -> None:
            try:
                async for message in request_iterator:
                    inbox.put_nowait(message)
            finally:
                inbox.put_nowait(None)

        receiver = asyncio.create_task(receive(), name="route-stream-receive")
        self._route_inboxes.add(inbox)
        try:
            while (message := await inbox.get()) is not None:
                yield self._answer(message)  # decisions are synchronous: answers keep request order
        finally:
            self._route_inboxes.discard(inbox)
            receiver.cancel()

    def _answer(self, message: router_pb2.RouteStreamRequest) -> router_pb2.RouteStreamResponse:
        """A RouteStream answer: the decision, or the refusal a unary Route would give as its status."""
        try:
            decision = self._decide(message.route, message.route.request_id)
        except InvalidRequest as error:
            return router_pb2.RouteStreamResponse(call_id=message.call_id, error=common_pb2.ErrorDetail(
                code=common_pb2.ERROR_CODE_INVALID_ARGUMENT, message=error.message, field=error.field or ""))
        except NoWorkerAvailable as error:
            return router_pb2.RouteStreamResponse(call_id=message.call_id, error=common_pb2.ErrorDetail(
                code=common_pb2.ERROR_CODE_UNAVAILABLE, message=error.message))
        return router_pb2.RouteStreamResponse(call_id=message.call_id, route=decision)

    def _decide(self, request: router_pb2.RouteRequest, request_id: str) -> router_pb2.RouteResponse:
        """One routing decision; raises InvalidRequest (naming the field) or NoWorkerAvailable."""
        started = time.perf_counter()
        if request_id:
            bind_request_id(request_id)
        try:
            route_context = self._route_context(request, request_id)
            snapshot = self._snapshot()
            decision = self._policy.select(route_context, snapshot)
            prefill = self._prefill.select(route_context, decision.worker, snapshot) if self._prefill else None
        except InvalidRequest:
            self._metrics.observe_decision("invalid", time.perf_counter() - started)
            raise
        except NoWorkerAvailable as error:
            self._metrics.observe_decision("unavailable", time.perf_counter() - started)
            log.warning("route failed", model=request.model, reason=error.message)
            raise
        worker = decision.worker
        (self._catalogue or self._registry).note_routed(worker.worker_id)
        if prefill is not None:
            (self._catalogue or self._registry).note_routed(prefill.worker_id)
        self._metrics.observe_decision("routed", time.perf_counter() - started)
        log.debug("routed", worker_id=worker.worker_id, score=round(decision.score, 3),
                  num_candidates=decision.num_candidates, prefill_worker_id=prefill.worker_id if prefill else None)
        return router_pb2.RouteResponse(worker_id=worker.worker_id, address=worker.info.address, prefill=prefill,
                                        only_candidate=_only_candidate(request, route_context, worker, snapshot))

    @staticmethod
    def _route_context(request: router_pb2.RouteRequest, request_id: str) -> RouteContext:
        if not request_id:
            raise InvalidRequest("request_id: must not be empty (or send x-request-id metadata)", "request_id")
        if not request.token_ids:
            raise InvalidRequest("token_ids: the prompt must have at least one token", "token_ids")
        overrides = request.overrides
        for name in ("kv_overlap_weight", "kv_temperature"):
            value = getattr(overrides, name)
            if overrides.HasField(name) and not (math.isfinite(value) and value >= 0):
                raise InvalidRequest(f"overrides.{name}: must be a number >= 0, got {value}", f"overrides.{name}")
        return RouteContext(
            request_id=request_id, model=request.model, token_ids=request.token_ids,
            exclude_worker_ids=frozenset(request.exclude_worker_ids),
            block_hashes=request.block_hashes, block_size=request.block_size,
            kv_overlap_weight=overrides.kv_overlap_weight if overrides.HasField("kv_overlap_weight") else None,
            kv_temperature=overrides.kv_temperature if overrides.HasField("kv_temperature") else None,
        )

    async def RegisterWorker(  # noqa: N802
        self,
        request_iterator: AsyncIterator[router_pb2.RegisterWorkerRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.RegisterWorkerResponse]:
        if self._catalogue is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "this router follows the Consul catalogue: register the worker with Consul")
        worker_id = ""
        registration_id = 0
        messages = aiter(request_iterator)
        closing = asyncio.ensure_future(self._closing.wait())
        next_message: asyncio.Future[router_pb2.RegisterWorkerRequest | None] | None = None
        try:
            while True:
                next_message = asyncio.ensure_future(anext(messages, None))
                await asyncio.wait({next_message, closing}, return_when=asyncio.FIRST_COMPLETED)
                if not next_message.done():
                    return  # router shutting down: end the stream; the worker reconnects elsewhere
                message = next_message.result()
                if message is None:
                    return  # the worker closed its side
                kind = message.WhichOneof("message")
                if kind == "register":
                    try:
                        info = info_from_proto(message.register)
                    except InvalidRequest as error:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
                    if worker_id and info.worker_id != worker_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "register.worker_id: cannot change on an open stream")
                    replaced = info.worker_id in self._registry
                    first = not worker_id
                    worker_id, registration_id = info.worker_id, self._registry.register(info)
                    self._metrics.registered_workers.set(len(self._registry))
                    if self._kv_feed is not None:
                        self._kv_feed.on_register(message.register)
                    log.info("worker registered", worker_id=worker_id, address=info.address,
                             model=info.model, role=info.role.value, replaced=replaced)
                    if first:
                        yield router_pb2.RegisterWorkerResponse(registered=True)
                elif kind == "load":
                    if not worker_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "register: the first message must be a registration")
                    current = self._registry.report_load(worker_id, registration_id, load_from_proto(message.load))
                    if current and self._health is not None:
                        self._health.note_alive(worker_id)
                    if current and self._kv_feed is not None:
                        self._kv_feed.on_load(worker_id, message.load.num_kv_blocks_used,
                                              message.load.num_kv_blocks_total)
                elif kind in ("kv_events", "kv_snapshot", "progress"):
                    if not worker_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            "register: the first message must be a registration")
                    if self._kv_feed is not None and self._registry.is_current(worker_id, registration_id):
                        if self._kv_message(self._kv_feed, worker_id, message):
                            yield router_pb2.RegisterWorkerResponse(send_kv_snapshot=True)
                else:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "message: must be register, load, kv_events, kv_snapshot or progress")
        finally:
            closing.cancel()
            if next_message is not None:
                next_message.cancel()  # a no-op once it is done
            if worker_id and self._registry.remove(worker_id, registration_id):
                self._metrics.registered_workers.set(len(self._registry))
                if self._kv_feed is not None:
                    self._kv_feed.on_removed(worker_id)
                log.info("worker removed", worker_id=worker_id)

    @staticmethod
    def _kv_message(feed: KvFeed, worker_id: str, message: router_pb2.RegisterWorkerRequest) -> bool:
        """Feed one KV or progress message; True when the worker must send a snapshot."""
        kind = message.WhichOneof("message")
        if kind == "kv_events":
            return feed.on_events(worker_id, message.kv_events)
        if kind == "kv_snapshot":
            return feed.on_snapshot(worker_id, message.kv_snapshot)
        feed.on_progress(worker_id, message.progress)
        return False

    async def ListWorkers(  # noqa: N802
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(
            workers=[
                router_pb2.WorkerStatus(
                    info=_info_to_proto(worker.info), load=_load_to_proto(worker.load), healthy=worker.healthy,
                    unhealthy_reason=self._health.reason(worker.worker_id) if self._health else "",
                )
                for worker in sorted(self._snapshot(), key=lambda worker: worker.worker_id)
            ]
        )

    async def ReportWorkerFailure(  # noqa: N802
        self, request: router_pb2.ReportWorkerFailureRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ReportWorkerFailureResponse:
        kind = _FAILURE_KINDS.get(request.kind)
        if not request.worker_id or kind is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "worker_id and kind (a WORKER_FAILURE_KIND other than UNSPECIFIED) are required")
        if self._health is None:
            return router_pb2.ReportWorkerFailureResponse(quarantined=False)
        quarantined = self._health.report(request.worker_id, request.address, kind,  # type: ignore[arg-type]
                                          request.detected_after_s or None)
        log.info("worker failure reported", worker_id=request.worker_id, kind=kind, detail=request.detail,
                 quarantined=quarantined)
        return router_pb2.ReportWorkerFailureResponse(quarantined=quarantined)

    def _snapshot(self) -> list[WorkerSnapshot]:
        workers = (self._catalogue or self._registry).snapshot()
        return self._health.apply(workers) if self._health is not None else workers


def _only_candidate(request: router_pb2.RouteRequest, context: RouteContext, chosen: WorkerSnapshot,
                    workers: list[WorkerSnapshot]) -> bool:
    """Whether every request of this model without overrides or exclusions gets ``chosen`` (or no worker):
    it is the only registered decode worker of the model, healthy or not, and no prefill worker is registered."""
    if request.exclude_worker_ids or request.HasField("overrides"):
        return False
    if any(worker.info.role is WorkerRole.PREFILL for worker in workers):
        return False
    # The policies' own role and model filters, without health: a quarantined rival may be back next time.
    serving = _MODEL_FILTER.filter(context, _ROLE_FILTER.filter(context, workers))
    return len(serving) == 1 and serving[0].worker_id == chosen.worker_id


_ROLE_FILTER, _MODEL_FILTER = RoleFilter(), ModelFilter()
