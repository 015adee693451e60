"""Start and stop the router in-process: ``await serve(config)``; ``__main__`` only adds flags and signals."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from services.router.config import RouterConfig
from services.router.consul_registry import ConsulRegistry
from services.router.disagg import DisaggMetrics, PrefillSelector, index_cached_tokens
from services.router.health_watch import HealthMetrics, WorkerHealthMonitor
from services.router.kv_approx import ApproximateCache
from services.router.kv_feed import KvFeed
from services.router.kv_index import KvIndex
from services.router.kv_load import LoadTracker
from services.router.kv_metrics import KvMetrics
from services.router.kv_scorer import KvRouter, KvWeights
from services.router.metrics import RouterMetrics
from services.router.policy import build_policy
from services.router.registry import EmbeddedRegistry, WorkerRegistry
from services.router.servicer import RouterServicer
from tandem.discovery.consul import ConsulRegistration
from tandem.grpc_server import GrpcService
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.telemetry.runtime import register_runtime_metrics

log = structlog.get_logger("router")

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


@dataclass(slots=True)
class RunningRouter:
    """A started router. ``port`` is the bound gRPC port (the real one when configured as 0)."""

    config: RouterConfig
    port: int
    metrics_port: int | None  # None when disabled
    metrics: RouterMetrics
    registry: EmbeddedRegistry
    kv_feed: KvFeed
    _grpc: GrpcService
    _servicer: RouterServicer
    _metrics_server: WSGIServer | None
    health: WorkerHealthMonitor | None = None
    catalogue: ConsulRegistry | None = None  # when the workers are listed by Consul
    _consul_registration: ConsulRegistration | None = None
    _stopped: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.config.host in ("0.0.0.0", "::") else f"{self.config.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, end the registration streams, finish in-flight calls within the grace period."""
        if self._stopped:
            return
        self._stopped = True
        if self._consul_registration is not None:
            await self._consul_registration.stop()
        await self._grpc.set_serving(False)
        self._servicer.close_streams()
        if self.health is not None:
            await self.health.stop()
        if self.catalogue is not None:
            await self.catalogue.stop()
        await self._grpc.stop(self.config.grace_s if grace_s is None else grace_s)
        if self._metrics_server is not None:
            # shutdown() waits out serve_forever's 0.5 s poll; keep it off the event loop.
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        log.info("router stopped")

    async def wait_for_termination(self) -> None:
        await self._grpc.server.wait_for_termination()


async def serve(config: RouterConfig, *, rng: random.Random | None = None) -> RunningRouter:
    """Bind, start and report SERVING. ``rng`` makes random tie-breaking repeatable in tests."""
    registry = EmbeddedRegistry(stale_after_s=config.worker_stale_s)
    metrics = RouterMetrics(CollectorRegistry())
    register_runtime_metrics(metrics.registry)
    # The KV view is kept whatever the policy (events are cheap); only `kv` routes by it.
    kv_index = KvIndex()
    kv = KvRouter(kv_index, LoadTracker(share_blocks=config.kv_decode_blocks == "shared"),
                  approximate=ApproximateCache(kv_index, config.kv_approx_ttl_s),
                  weights=KvWeights(config.kv_overlap_weight, config.kv_temperature), rng=rng)
    kv_metrics = KvMetrics(metrics.registry)
    kv_feed = KvFeed(kv, kv_metrics, approximate_only=config.kv_approximate)
    policy = build_policy(config.policy, rng, kv=kv, kv_metrics=kv_metrics)
    catalogue = ConsulRegistry(config.consul()) if config.registry == "consul" else None
    listed: WorkerRegistry = catalogue if catalogue is not None else registry
    health = WorkerHealthMonitor(listed, HealthMetrics(metrics.registry), config.health_watch())
    prefill = PrefillSelector(config.disagg(), DisaggMetrics(metrics.registry),
                              cached_tokens=index_cached_tokens(kv_index), rng=rng)
    servicer = RouterServicer(registry, policy, metrics, kv_feed, health=health, catalogue=catalogue,
                              prefill=prefill)
    grpc_service = GrpcService(config.host, config.port, [SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, grpc_service.server)
    metrics_server: WSGIServer | None = None
    metrics_port: int | None = None
    if config.metrics_port:
        metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        metrics_port = metrics_server.server_address[1]
    await grpc_service.start()
    if catalogue is not None:
        catalogue.start()
    health.start()
    await grpc_service.set_serving(True)
    consul_registration = None
    if catalogue is not None:
        address = f"{config.advertise_host}:{grpc_service.port}"
        consul_registration = ConsulRegistration(config.consul(), role="router", service_id=f"router-{address}",
                                                 address=address, meta={"policy": config.policy})
        consul_registration.start()
    log.info("router serving", port=grpc_service.port, metrics_port=metrics_port, policy=config.policy,
             registry=config.registry, remote_prefill_threshold=config.remote_prefill_threshold,
             enforce_disagg=config.enforce_disagg)
    return RunningRouter(
        config=config, port=grpc_service.port, metrics_port=metrics_port, metrics=metrics, registry=registry,
        kv_feed=kv_feed, _grpc=grpc_service, _servicer=servicer, _metrics_server=metrics_server,
        health=health, catalogue=catalogue, _consul_registration=consul_registration,
    )
