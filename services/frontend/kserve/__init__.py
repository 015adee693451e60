"""Triton / KServe v2 compatibility: the `inference.GRPCInferenceService` gRPC service and the
v2 HTTP endpoints, speaking the tensor names of Triton's vLLM and TensorRT-LLM backends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc
    from aiohttp import web

    from services.frontend.pipeline import Pipeline


class KServeApi:
    """The frontend's plug-in (services.frontend.server.FrontendApi): gRPC service and /v2 routes."""

    def __init__(self, pipeline: Pipeline) -> None:
        from services.frontend.kserve.grpc_service import SERVICE_NAME
        from tandem.proto.kserve._pool import POOL

        self.pipeline = pipeline
        self.service_names: Sequence[str] = (SERVICE_NAME,)
        self.descriptor_pools: Sequence[object] = (POOL,)  # for reflection: not the default pool

    def add_to_grpc_server(self, server: grpc.aio.Server) -> None:
        from services.frontend.kserve.grpc_service import add_kserve_to_grpc_server

        add_kserve_to_grpc_server(server, self.pipeline)

    def add_http_routes(self, app: web.Application) -> None:
        from services.frontend.kserve.http import add_kserve_routes

        add_kserve_routes(app, self.pipeline)


def create_api(pipeline: Pipeline) -> KServeApi:
    """Called by the frontend's serve() when this package is installed."""
    return KServeApi(pipeline)
