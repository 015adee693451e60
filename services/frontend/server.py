"""Start the frontend: the shared pipeline, the OpenAI HTTP API and the gRPC APIs on their ports."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from services.frontend.grpc_api import GenerationApi
from services.frontend.metrics import FrontendMetrics
from services.frontend.openai_http import OpenAIHttpApi, create_app
from services.frontend.pipeline import Pipeline
from tandem.discovery.consul import REGISTRIES, ConsulRegistration, ConsulSettings
from tandem.grpc_server import GrpcService
from tandem.models import resolve_model, served_model_name
from tandem.telemetry.runtime import register_runtime_metrics

log = structlog.get_logger(__name__)

_KSERVE_MODULE = "services.frontend.kserve"


@dataclass(slots=True)
class FrontendConfig:
    model: str = ""  # a local Hugging Face model directory; empty = the default model
    served_model_name: str | None = None  # the name clients send; default: from the model
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    router_address: str = "127.0.0.1:9100"
    request_timeout_s: float | None = 600.0  # whole-request deadline on the worker call; None = none
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_reroutes: int = 2  # other workers tried when one fails before the first token
    migration_limit: int = 3  # times a request may move to another worker after tokens were streamed
    # No token for this long from a worker that already streamed some: the worker is hung; the request
    # (and every other on that worker) migrates. Generous by default: a CPU worker's step can take
    # seconds when a long prompt's prefill shares it.
    stall_timeout_s: float | None = 5.0
    first_token_timeout_s: float | None = None  # the same before the first token (queueing counts); None = off
    max_inflight_requests: int = 1024  # requests at the workers at once; more wait in the queue
    max_queued_requests: int = 1024  # beyond this, 503 + Retry-After / RESOURCE_EXHAUSTED at once
    queue_timeout_s: float = 30.0  # longest wait in the queue before the same answer
    # Start a request on the model's only worker while its Route is on the way, when the router said that
    # worker is the only one it could choose (RouteResponse.only_candidate); False: always wait for the answer.
    predict_routes: bool = True
    # One GenerateStream to each worker carries its requests (off: a Generate call per request).
    worker_streams: bool = True
    # "consul": list this frontend in the local Consul agent (a gRPC check on grpc_port), for load
    # balancers and discovery; "embedded": no registration (frontends take no routed work).
    registry: str = "embedded"
    consul_address: str = "127.0.0.1:8500"
    consul_service_prefix: str = "tandem"
    advertise_host: str = "127.0.0.1"  # the host Consul is given for this frontend

    def consul(self) -> ConsulSettings:
        return ConsulSettings(address=self.consul_address, service_prefix=self.consul_service_prefix)
    retry_after_s: int = 1  # Retry-After on 503s
    shutdown_grace_s: float = 10.0  # how long in-flight requests may finish on stop
    enable_kserve: bool = True  # serve services.frontend.kserve too, when it is installed

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid frontend setting {name}: {why}")

        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise bad(name, f"must be in [0, 65535] (0 picks a free port), got {port}")
        if not self.router_address or ":" not in self.router_address:
            raise bad("router_address", f"must be host:port, got {self.router_address!r}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise bad("request_timeout_s", f"must be positive, got {self.request_timeout_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", f"must be at least 2, got {self.max_model_len}")
        if self.max_reroutes < 0:
            raise bad("max_reroutes", f"must be >= 0, got {self.max_reroutes}")
        if self.migration_limit < 0:
            raise bad("migration_limit", f"must be >= 0, got {self.migration_limit}")
        for name in ("stall_timeout_s", "first_token_timeout_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise bad(name, f"must be positive (or unset to disable), got {value}")
        if self.max_inflight_requests < 1:
            raise bad("max_inflight_requests", f"must be >= 1, got {self.max_inflight_requests}")
        if self.max_queued_requests < 0:
            raise bad("max_queued_requests", f"must be >= 0, got {self.max_queued_requests}")
        if not self.queue_timeout_s > 0:
            raise bad("queue_timeout_s", f"must be positive, got {self.queue_timeout_s}")
        if self.registry not in REGISTRIES:
            raise bad("registry", f"{self.registry!r} is not one of {', '.join(REGISTRIES)}")
        if self.registry == "consul":
            try:
                self.consul()
            except ValueError as error:
                raise ValueError(str(error).replace("invalid setting", "invalid frontend setting", 1)) from None
        if self.retry_after_s < 0:
            raise bad("retry_after_s", f"must be >= 0, got {self.retry_after_s}")
        if self.shutdown_grace_s < 0:
            raise bad("shutdown_grace_s", f"must be >= 0, got {self.shutdown_grace_s}")


class FrontendApi(Protocol):
    """An API served on the frontend's ports on top of the shared pipeline (native gRPC, KServe).

    Built once by ``serve`` before the servers start; a KServe module takes part by exposing
    ``create_api(pipeline: Pipeline) -> FrontendApi``.
    """

    service_names: Sequence[str]  # gRPC services, for health and reflection

    def add_to_grpc_server(self, server: grpc.aio.Server) -> None:
        """Register the servicers; called once, before the server starts."""

    def add_http_routes(self, app: web.Application) -> None:
        """Add HTTP routes (may add none); called once, before the HTTP server starts."""


class RunningFrontend:
    """A started frontend; ``http_port``/``grpc_port`` are the bound ports (real ones for port 0)."""

    def __init__(self, config: FrontendConfig, pipeline: Pipeline, grpc_service: GrpcService,
                 runner: web.AppRunner, http_port: int) -> None:
        self.config = config
        self.pipeline = pipeline
        self.grpc_service = grpc_service
        self.http_port = http_port
        self.grpc_port = grpc_service.port
        self._runner = runner
        self.draining = False
        self._stopped = asyncio.Event()
        self.consul_registration: ConsulRegistration | None = None

    @property
    def model_name(self) -> str:
        return self.pipeline.model_name

    async def stop(self) -> None:
        """NOT_SERVING, refuse new work, let in-flight requests finish within the grace, close."""
        if self.draining:
            await self._stopped.wait()
            return
        self.draining = True
        grace_s = self.config.shutdown_grace_s
        log.info("frontend stopping", grace_s=grace_s)
        if self.consul_registration is not None:
            await self.consul_registration.stop()
        await self.grpc_service.set_serving(False)
        # The HTTP runner closes its listeners, then waits up to its shutdown_timeout (the same grace).
        await asyncio.gather(self.grpc_service.stop(grace_s), self._runner.cleanup())
        await self.pipeline.close()
        self._stopped.set()
        log.info("frontend stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: FrontendConfig, *, registry: CollectorRegistry | None = None) -> RunningFrontend:
    """Load the tokenizer, start both servers and return once they listen. Raises on bad config."""
    model_path = await asyncio.to_thread(resolve_model, config.model or None)
    model_name = config.served_model_name or served_model_name(model_path)
    metrics = FrontendMetrics(registry if registry is not None else CollectorRegistry())
    register_runtime_metrics(metrics.registry)
    pipeline = await Pipeline.from_model_dir(
        model_path, model_name=model_name, max_model_len=config.max_model_len,
        router_address=config.router_address, metrics=metrics,
        request_timeout_s=config.request_timeout_s, max_reroutes=config.max_reroutes,
        migration_limit=config.migration_limit, stall_timeout_s=config.stall_timeout_s,
        first_token_timeout_s=config.first_token_timeout_s, max_inflight_requests=config.max_inflight_requests,
        max_queued_requests=config.max_queued_requests, queue_timeout_s=config.queue_timeout_s,
        predict_routes=config.predict_routes, worker_streams=config.worker_streams,
    )
    apis: list[FrontendApi] = [GenerationApi(pipeline), *_optional_apis(config, pipeline)]

    grpc_service = GrpcService(config.host, config.grpc_port,
                               [name for api in apis for name in api.service_names],
                               extra_pools=[p for api in apis for p in getattr(api, "descriptor_pools", ())])
    for api in apis:
        api.add_to_grpc_server(grpc_service.server)

    frontend: RunningFrontend | None = None
    http_api = OpenAIHttpApi(pipeline, is_draining=lambda: frontend is not None and frontend.draining,
                             retry_after_s=config.retry_after_s)
    app = create_app(http_api)
    for api in apis:
        api.add_http_routes(app)
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # worker call, even while no token is being written (long prefill, slow worker).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.http_port)
        await site.start()
        http_port = _bound_port(runner, config.http_port)
        await grpc_service.start()
    except BaseException:
        await runner.cleanup()
        await pipeline.close()
        raise
    frontend = RunningFrontend(config, pipeline, grpc_service, runner, http_port)
    await grpc_service.set_serving(True)
    if config.registry == "consul":
        address = f"{config.advertise_host}:{grpc_service.port}"
        frontend.consul_registration = ConsulRegistration(
            config.consul(), role="frontend", service_id=f"frontend-{address}", address=address,
            meta={"model": model_name, "http_port": str(http_port)})
        frontend.consul_registration.start()
    log.info("frontend serving", model=model_name, http_port=http_port, grpc_port=grpc_service.port,
             router=config.router_address, apis=[type(api).__name__ for api in apis])
    return frontend


def _optional_apis(config: FrontendConfig, pipeline: Pipeline) -> list[FrontendApi]:
    """KServe v2 / Triton, through its package's create_api(pipeline), when the package is there."""
    if not config.enable_kserve or importlib.util.find_spec(_KSERVE_MODULE) is None:
        return []
    create_api = getattr(importlib.import_module(_KSERVE_MODULE), "create_api", None)
    if create_api is None:
        log.warning("kserve package has no create_api(pipeline); not serving it", module=_KSERVE_MODULE)
        return []
    return [create_api(pipeline)]


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
