"""Start and stop a decode worker in-process: ``await serve(config)``; ``__main__`` adds flags and signals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from services.decode.config import DecodeConfig
from services.decode.convert import load_from_stats
from services.decode.kv_publisher import RequestProgress
from services.decode.metrics import DecodeMetrics
from services.decode.registration import RouterRegistration
from services.decode.remote_prefill import RemotePrefill
from services.decode.servicer import WorkerServicer
from tandem.discovery.consul import ConsulRegistration
from tandem.engine.config import EngineConfig
from tandem.engine.factory import create_engine
from tandem.engine.protocol import Engine
from tandem.engine.types import StepInfo
from tandem.grpc_server import GrpcService
from tandem.kv.events import KvEventSource
from tandem.kv.transfer.metrics import PullMetrics
from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
from tandem.models import resolve_model
from tandem.procinfo import own_identity, process_meta, process_to_proto
from tandem.proto.router.v1 import router_pb2
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc
from tandem.telemetry.runtime import register_runtime_metrics

log = structlog.get_logger("decode")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
EngineFactory = Callable[[EngineConfig, Callable[[StepInfo], None] | None], Engine]
_WATCH_INTERVAL_S = 0.1
_FINAL_GRACE_S = 0.1  # after draining, what is left (health Watch streams, late calls) is cancelled


@dataclass(slots=True)
class DecodeWorker:
    """A started decode worker. ``port`` is the bound gRPC port (the real one when configured as 0)."""

    config: DecodeConfig
    worker_id: str
    port: int
    address: str  # advertised host:port
    metrics_port: int | None  # None when disabled
    engine: Engine
    metrics: DecodeMetrics
    registration: RouterRegistration | ConsulRegistration | None
    _grpc: GrpcService
    _servicer: WorkerServicer
    _metrics_server: WSGIServer | None
    remote_prefill: RemotePrefill | None = None  # None when the engine cannot import KV
    _watch_task: asyncio.Task[None] | None = None
    _serving: bool = False
    _stopping: asyncio.Task[None] | None = field(default=None)
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # set once the engine died

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Deregister, NOT_SERVING, let in-flight requests finish (up to the drain timeout), stop."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(drain_timeout_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, drain_timeout_s: float | None) -> None:
        timeout_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        # Leave the router first, so no new request is routed here while draining.
        if self.registration is not None:
            await self.registration.stop()
        self._servicer.start_draining()
        await self._set_serving(False)
        num_in_flight = self._servicer.num_in_flight
        if num_in_flight:
            log.info("draining", num_in_flight=num_in_flight, timeout_s=timeout_s)
        if not await self._servicer.wait_idle(timeout_s):
            log.warning("drain timed out; cancelling what is left", num_in_flight=self._servicer.num_in_flight)
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self._grpc.stop(_FINAL_GRACE_S)
        if self.remote_prefill is not None:
            await self.remote_prefill.close()
        await self.engine.shutdown()
        if self._metrics_server is not None:
            # shutdown() waits out serve_forever's 0.5 s poll; keep it off the event loop.
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        log.info("decode worker stopped", worker_id=self.worker_id)

    async def wait_for_termination(self) -> None:
        await self._grpc.server.wait_for_termination()

    async def _set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            await self._grpc.set_serving(serving)

    async def _watch(self) -> None:
        """Refresh the load gauges; report NOT_SERVING (and leave the router) once the engine dies."""
        while True:
            try:
                self.metrics.observe_stats(self.engine.stats())
            except Exception:  # a stats bug must not stop the health check below
                log.exception("engine stats failed")
            if self._serving and not self.engine.healthy():
                log.error("engine is no longer healthy; reporting NOT_SERVING, then exiting")
                await self._set_serving(False)
                if self.registration is not None:
                    await self.registration.stop()
                self.failed.set()  # the process stops and exits non-zero: a supervisor starts a new one
            await asyncio.sleep(_WATCH_INTERVAL_S)


async def serve(config: DecodeConfig, *, engine_factory: EngineFactory = create_engine) -> DecodeWorker:
    """Bind (NOT_SERVING), load the engine, report SERVING, then register with the router if configured.

    ``engine_factory`` defaults to ``create_engine``; tests pass a fake built the same way.
    """
    model_path = await asyncio.to_thread(resolve_model, config.model or None)  # may convert once (~30 s)
    metrics = DecodeMetrics(CollectorRegistry())
    register_runtime_metrics(metrics.registry)
    engine = engine_factory(config.engine_config(model_path), metrics.observe_step)
    progress = RequestProgress()  # first tokens and finishes, for the router's load prediction
    remote_prefill = None
    if hasattr(engine, "reserve_kv") and hasattr(engine, "generate_imported"):
        keep_large_buffers_in_heap()  # received KV chunks are megabyte buffers (see tuning.py)
        remote_prefill = RemotePrefill(engine, config, PullMetrics(metrics.registry))  # type: ignore[arg-type]
    servicer = WorkerServicer(engine, metrics, progress, remote_prefill)
    grpc_service = GrpcService(config.host, config.port, [SERVICE_NAME])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, grpc_service.server)
    await grpc_service.start()  # NOT_SERVING until the model is loaded
    metrics_server: WSGIServer | None = None
    try:
        if config.metrics_port:
            metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        log.info("loading engine", model=str(model_path), engine=config.engine, port=grpc_service.port)
        await engine.start()
        if remote_prefill is not None:
            await remote_prefill.start_helpers()
    except BaseException:
        if remote_prefill is not None:
            await remote_prefill.close()
        with contextlib.suppress(Exception):  # free what a half-started engine holds
            await engine.shutdown()
        await grpc_service.stop(0)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        raise
    address = f"{config.advertise_host}:{grpc_service.port}"
    worker_id = config.worker_id or f"decode-{config.advertise_host}-{grpc_service.port}"
    registration: RouterRegistration | ConsulRegistration | None = None
    if config.registry == "consul":
        # The agent health-checks this server over gRPC; Consul carries no load, so the router polls
        # GetStats for it.
        registration = ConsulRegistration(
            config.consul(), role="decode", service_id=worker_id, address=address,
            meta={"model": engine.model_name, "max_model_len": str(engine.max_model_len),
                  "block_size": str(config.block_size), **process_meta(own_identity())},
        )
    elif config.router_address:
        kv_source = engine if isinstance(engine, KvEventSource) else None
        info = router_pb2.WorkerInfo(
            worker_id=worker_id, role=router_pb2.WORKER_ROLE_DECODE, address=address, model=engine.model_name,
            max_model_len=engine.max_model_len, block_size=config.block_size,
            publishes_kv_events=kv_source is not None, process=process_to_proto(own_identity()),
        )
        registration = RouterRegistration(config.router_address, info, lambda: load_from_stats(engine.stats()),
                                          kv_source=kv_source, progress=progress)
    worker = DecodeWorker(
        config=config, worker_id=worker_id, port=grpc_service.port, address=address,
        metrics_port=metrics_server.server_address[1] if metrics_server else None, engine=engine, metrics=metrics,
        registration=registration, _grpc=grpc_service, _servicer=servicer, _metrics_server=metrics_server,
        remote_prefill=remote_prefill,
    )
    await worker._set_serving(True)
    worker._watch_task = asyncio.create_task(worker._watch(), name="decode-watch")
    if registration is not None:
        registration.start()
    log.info("decode worker serving", worker_id=worker_id, address=address, model=engine.model_name,
             metrics_port=worker.metrics_port, router=config.router_address or None, registry=config.registry)
    return worker
