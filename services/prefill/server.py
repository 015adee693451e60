"""Start and stop a prefill worker in-process: ``await serve(config)``; ``__main__`` adds flags and signals."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from services.decode.convert import load_from_stats
from services.decode.metrics import DecodeMetrics
from services.decode.registration import RouterRegistration
from services.prefill.config import PrefillConfig
from services.prefill.exporter import exporter_args
from services.prefill.servicer import SERVICE_NAME, PrefillServicer
from tandem.engine.config import EngineConfig
from tandem.engine.factory import create_engine
from tandem.engine.types import StepInfo
from tandem.grpc_server import GrpcService
from tandem.kv.events import KvEventSource
from tandem.kv.transfer.children import HelperProcesses
from tandem.kv.transfer.export import GrpcChunkExporter, ShmChunkExporter
from tandem.kv.transfer.host import host_id
from tandem.kv.transfer.metrics import ExportMetrics
from tandem.kv.transfer.protocol import ChunkExporter, PrefillEngine
from tandem.kv.transfer.sweep import sweep_orphans
from tandem.models import resolve_model
from tandem.procinfo import own_identity, process_to_proto
from tandem.proto.kv.v1 import kv_pb2
from tandem.proto.router.v1 import router_pb2
from tandem.telemetry.runtime import register_runtime_metrics

log = structlog.get_logger("prefill")

EngineFactory = Callable[[EngineConfig, Callable[[StepInfo], None] | None], object]
_WATCH_INTERVAL_S = 0.1
_FINAL_GRACE_S = 0.1


@dataclass(slots=True)
class PrefillWorker:
    """A started prefill worker. ``port`` is the bound gRPC port (the real one when configured as 0)."""

    config: PrefillConfig
    worker_id: str
    port: int
    address: str  # advertised host:port
    metrics_port: int | None
    engine: PrefillEngine
    metrics: DecodeMetrics  # engine step and load figures, as on a decode worker
    export_metrics: ExportMetrics
    servicer: PrefillServicer
    registration: RouterRegistration | None
    _grpc: GrpcService
    _exporters: list[ChunkExporter]
    _metrics_server: WSGIServer | None
    _closers: list[Callable[[], None] | HelperProcesses] = field(default_factory=list)
    _exporter_processes: HelperProcesses | None = None  # --kv-export-processes (also in _closers, for order)
    _export_addresses: list[str] = field(default_factory=list)  # theirs, in start order
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _serving: bool = False
    _stopping: asyncio.Task[None] | None = None
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # set once the engine died

    @property
    def exporter_pids(self) -> list[int]:
        """The exporter processes (``--kv-export-processes``) while the worker runs."""
        return self._exporter_processes.pids if self._exporter_processes is not None else []

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        """Deregister, NOT_SERVING, let running prefills and pulls finish (up to the drain timeout), stop."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(drain_timeout_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, drain_timeout_s: float | None) -> None:
        timeout_s = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.registration is not None:
            await self.registration.stop()
        self.servicer.start_draining()
        await self._set_serving(False)
        # Decode workers may still be pulling what was prefilled here: give them the drain time.
        deadline = time.monotonic() + timeout_s
        while (self.servicer.num_in_flight or len(self.servicer.leases)) and time.monotonic() < deadline:  # noqa: ASYNC110 (two counters, no event)
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._grpc.stop(_FINAL_GRACE_S)
        await self.servicer.leases.release_all()
        for exporter in self._exporters:
            exporter.close()
        await self.engine.shutdown()
        await _close_all(self._closers)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        log.info("prefill worker stopped", worker_id=self.worker_id)

    async def _set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            await self._grpc.set_serving(serving)

    async def _watch(self) -> None:
        """Refresh the gauges; report NOT_SERVING (and leave the router) once the engine dies."""
        while True:
            try:
                self.metrics.observe_stats(self.engine.stats())
            except Exception:
                log.exception("engine stats failed")
            self._drop_exited_exporters()
            if self._serving and not self.engine.healthy():
                log.error("engine is no longer healthy; reporting NOT_SERVING, then exiting")
                await self._set_serving(False)
                if self.registration is not None:
                    await self.registration.stop()
                self.failed.set()  # the process stops and exits non-zero: a supervisor starts a new one
            await asyncio.sleep(_WATCH_INTERVAL_S)

    def _drop_exited_exporters(self) -> None:
        """Handles stop listing an exporter process that exited (its pulls would only fail and retry)."""
        exporters = self._exporter_processes
        if exporters is None:
            return
        live = [address for i, address in enumerate(self._export_addresses) if exporters.alive(i)]
        if live != self.servicer.pull_addresses:
            gone = sorted(set(self.servicer.pull_addresses) - set(live))
            log.error("a KV exporter process exited; handles no longer list it", exporters=gone,
                      exporters_left=len(live))
            self.servicer.pull_addresses = live


async def _close_all(closers: list[Callable[[], None] | HelperProcesses]) -> None:
    """In reverse order of start: exporter processes first, then the pool file they mapped."""
    for close in reversed(closers):
        if isinstance(close, HelperProcesses):
            await close.close()
        else:
            close()


async def serve(config: PrefillConfig, *, engine_factory: EngineFactory = create_engine) -> PrefillWorker:
    """Bind (NOT_SERVING), load the engine, report SERVING, then register with the router as a prefill worker."""
    # What a killed predecessor left in shared memory, before this worker makes files of its own.
    await asyncio.to_thread(sweep_orphans, config.shm_dir)
    model_path = await asyncio.to_thread(resolve_model, config.model or None)
    metrics = DecodeMetrics(CollectorRegistry())
    register_runtime_metrics(metrics.registry)
    export_metrics = ExportMetrics(metrics.registry)
    engine = engine_factory(config.engine_config(model_path), metrics.observe_step)
    if not hasattr(engine, "prefill") or not hasattr(engine, "read_kv"):
        raise ValueError(f"invalid prefill setting engine: {config.engine!r} cannot export KV blocks")
    prefill_engine = cast(PrefillEngine, engine)
    grpc_service = GrpcService(config.host, config.port, [SERVICE_NAME])
    address = f"{config.advertise_host}:{grpc_service.port}"
    exporters: dict[int, ChunkExporter] = {kv_pb2.KV_TRANSPORT_GRPC: GrpcChunkExporter()}
    if config.serves_shm:
        exporters[kv_pb2.KV_TRANSPORT_SHM] = ShmChunkExporter(config.shm_dir, config.shm_pool_bytes)
    servicer = PrefillServicer(prefill_engine, exporters, export_metrics, lease_s=config.kv_lease_s,
                               address=address, host_id=host_id(config.shm_dir))
    servicer.add_to_server(grpc_service.server)
    await grpc_service.start()  # NOT_SERVING until the model is loaded
    metrics_server: WSGIServer | None = None
    closers: list[Callable[[], None] | HelperProcesses] = []  # exporters, shared-memory files, at stop
    exporter_processes: HelperProcesses | None = None
    try:
        if config.metrics_port:
            metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        log.info("loading engine", model=str(model_path), engine=config.engine, port=grpc_service.port)
        await prefill_engine.start()
        share = getattr(prefill_engine, "share_kv_pool", None)
        if (config.serves_shm or config.kv_export_processes) and share is not None:
            # Same-host decode workers then copy blocks straight out of this engine's pool, and
            # exporter processes read it.
            shared_pool = await share(config.shm_dir)
            if shared_pool is not None:
                if config.serves_shm:
                    servicer.shared_pool = shared_pool.info
                closers.append(shared_pool.close)
                if config.kv_export_processes:
                    exporter_processes = HelperProcesses("services.prefill.exporter", exporter_args(
                        address, config.host, config.shm_dir, shared_pool.info, prefill_engine.kv_layout()),
                        config.kv_export_processes)
                    closers.append(exporter_processes)
                    ports = await exporter_processes.start()
                    servicer.pull_addresses = [f"{config.advertise_host}:{port}" for port in ports]
        if config.kv_export_processes and not servicer.pull_addresses:
            log.warning("no exporter processes: the KV pool is not in host memory; the worker serves pulls itself")
    except BaseException:
        with contextlib.suppress(Exception):
            await prefill_engine.shutdown()
        await grpc_service.stop(0)
        for exporter in exporters.values():
            exporter.close()
        await _close_all(closers)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        raise
    worker_id = config.worker_id or f"prefill-{config.advertise_host}-{grpc_service.port}"
    registration = None
    if config.router_address:
        # Prefill workers publish KV events too, so the router can send a prompt to the one that
        # already holds its prefix.
        kv_source = prefill_engine if isinstance(prefill_engine, KvEventSource) else None
        info = router_pb2.WorkerInfo(
            worker_id=worker_id, role=router_pb2.WORKER_ROLE_PREFILL, address=address,
            model=prefill_engine.model_name, max_model_len=prefill_engine.max_model_len, block_size=config.block_size,
            publishes_kv_events=kv_source is not None, process=process_to_proto(own_identity()))
        registration = RouterRegistration(config.router_address, info,
                                          lambda: load_from_stats(prefill_engine.stats()), kv_source=kv_source)
    worker = PrefillWorker(
        config=config, worker_id=worker_id, port=grpc_service.port, address=address,
        metrics_port=metrics_server.server_address[1] if metrics_server else None, engine=prefill_engine,
        metrics=metrics, export_metrics=export_metrics, servicer=servicer, registration=registration,
        _grpc=grpc_service, _exporters=list(exporters.values()), _metrics_server=metrics_server, _closers=closers,
        _exporter_processes=exporter_processes, _export_addresses=list(servicer.pull_addresses))
    await worker._set_serving(True)
    worker._tasks.append(asyncio.create_task(worker._watch(), name="prefill-watch"))
    expiry_interval_s = min(1.0, config.kv_lease_s / 4)
    worker._tasks.append(asyncio.create_task(servicer.leases.run_expiry(expiry_interval_s), name="lease-expiry"))
    if registration is not None:
        registration.start()
    log.info("prefill worker serving", worker_id=worker_id, address=address, model=prefill_engine.model_name,
             lease_s=config.kv_lease_s, transports=sorted(e.name for e in exporters.values()),
             router=config.router_address or None)
    return worker
