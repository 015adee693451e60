"""Start and stop the router in-process: ``await serve(config)``; ``__main__`` only adds flags and signals."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, start_http_server

from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.policy import build_policy
from services.router.registry import EmbeddedRegistry
from services.router.servicer import RouterServicer
from tandem.grpc_server import GrpcService
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

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
    _grpc: GrpcService
    _servicer: RouterServicer
    _metrics_server: WSGIServer | None
    _stopped: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}" if self.config.host in ("0.0.0.0", "::") else f"{self.config.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, end the registration streams, finish in-flight calls within the grace period."""
        if self._stopped:
            return
        self._stopped = True
        await self._grpc.set_serving(False)
        self._servicer.close_streams()
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
    servicer = RouterServicer(registry, build_policy(config.policy, rng), metrics)
    grpc_service = GrpcService(config.host, config.port, [SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, grpc_service.server)
    metrics_server: WSGIServer | None = None
    metrics_port: int | None = None
    if config.metrics_port:
        metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        metrics_port = metrics_server.server_address[1]
    await grpc_service.start()
    await grpc_service.set_serving(True)
    log.info("router serving", port=grpc_service.port, metrics_port=metrics_port, policy=config.policy)
    return RunningRouter(
        config=config, port=grpc_service.port, metrics_port=metrics_port, metrics=metrics, registry=registry,
        _grpc=grpc_service, _servicer=servicer, _metrics_server=metrics_server,
    )
