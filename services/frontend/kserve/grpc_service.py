"""`inference.GRPCInferenceService` on the frontend's gRPC port: health, metadata, config,
ModelInfer (whole completion) and ModelStreamInfer (many requests per stream, one response
per token delta). RPCs outside the subset in protos/kserve answer UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from services.frontend.grpc_api import grpc_status_for
from services.frontend.kserve.codec import (
    Tensor,
    decode_grpc_inputs,
    encode_grpc_outputs,
    parameters_from_proto,
)
from services.frontend.kserve.model import MODEL_VERSION, model_config, model_metadata, server_metadata
from services.frontend.kserve.service import KServeFrontend, Prepared, ReadyCheck
from services.frontend.pipeline import Pipeline
from tandem.errors import TandemError
from tandem.grpc_server import request_id_from_context
from tandem.proto.kserve import grpc_service_pb2 as pb
from tandem.proto.kserve import grpc_service_pb2_grpc as pb_grpc
from tandem.proto.kserve import model_config_pb2

log = structlog.get_logger(__name__)

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Request parameter asking that the last response of a request be marked (Triton's decoupled
# protocol); the mark is the response parameter below.
ENABLE_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


class KServeGrpcServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, frontend: KServeFrontend) -> None:
        self.frontend = frontend

    # -- health and metadata ------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.frontend.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.frontend.check_model(request.name, request.version)
        except TandemError:
            return pb.ModelReadyResponse(ready=False)  # as Triton: not an error, just not ready
        return pb.ModelReadyResponse(ready=await self.frontend.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        await self._check_model(request.name, request.version, context)
        return json_format.ParseDict(model_metadata(self.frontend.model_name), pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        await self._check_model(request.name, request.version, context)
        config = model_config(self.frontend.model_name, self.frontend.pipeline.max_model_len)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        ready = await self.frontend.ready()
        response = pb.RepositoryIndexResponse()
        if ready or not request.ready:
            response.models.add(name=self.frontend.model_name, version=MODEL_VERSION,
                                state="READY" if ready else "UNAVAILABLE",
                                reason="" if ready else "no healthy decode worker")
        return response

    async def _check_model(self, name: str, version: str, context: Any) -> None:
        try:
            self.frontend.check_model(name, version)
        except TandemError as exc:
            await context.abort(*grpc_status_for(exc))

    # -- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            prepared = self._prepare(request, "kserve_infer", streaming_endpoint=False,
                                     request_id=request_id_from_context(context))
            tensors = await self.frontend.complete(prepared)
        except TandemError as exc:
            await context.abort(*grpc_status_for(exc))
        return _infer_response(request, tensors, self.frontend.model_name)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs in its own task; their responses interleave on the one stream.

        A failed request answers with error_message and the stream carries on. The stream ends
        once the client has half-closed it and every request has finished.
        """
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_one(request, responses))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(list(tasks))
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:  # the client went away or the stream ended: abort what still runs
            for task in [reader, *tasks]:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _stream_one(self, request: pb.ModelInferRequest,
                          responses: asyncio.Queue[pb.ModelStreamInferResponse | None]) -> None:
        mark_final = parameters_from_proto(request.parameters).get(ENABLE_FINAL_RESPONSE) is True
        model_name = self.frontend.model_name
        try:
            prepared = self._prepare(request, "kserve_stream_infer", streaming_endpoint=True)
            async for chunk in self.frontend.run(prepared, stream=prepared.kserve.stream):
                response = _infer_response(request, chunk.tensors, model_name)
                if mark_final:
                    response.parameters[FINAL_RESPONSE].bool_param = chunk.final
                responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
        except TandemError as exc:
            _, message = grpc_status_for(exc)
            responses.put_nowait(_error_response(request, message, model_name, mark_final))
        except Exception as exc:  # one request's bug must not end the other requests on the stream
            log.exception("stream request failed", request_id=request.id)
            responses.put_nowait(_error_response(request, f"internal error: {exc}", model_name, mark_final))

    def _prepare(self, request: pb.ModelInferRequest, endpoint: str, *, streaming_endpoint: bool,
                 request_id: str | None = None) -> Prepared:
        """``request_id``: the x-request-id metadata of a unary call; a stream's requests each get
        a fresh one, as they share the stream's metadata."""
        parameters = parameters_from_proto(request.parameters)
        try:
            tensors = decode_grpc_inputs(request)
        except TandemError as exc:
            self.frontend.count_rejected(endpoint, parameters, exc)
            raise
        return self.frontend.prepare(
            model_name=request.model_name, version=request.model_version, tensors=tensors,
            parameters=parameters, requested_outputs=[output.name for output in request.outputs],
            endpoint=endpoint, streaming_endpoint=streaming_endpoint, request_id=request_id,
        )


def _infer_response(request: pb.ModelInferRequest, tensors: list[Tensor], model_name: str) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request.id)
    encode_grpc_outputs(tensors, response)
    return response


def _error_response(request: pb.ModelInferRequest, message: str, model_name: str,
                    mark_final: bool) -> pb.ModelStreamInferResponse:
    # The id lets a client with several requests on the stream tell which one failed; an error
    # also ends its request, so it carries the final mark when one was asked for.
    response = pb.ModelInferResponse(model_name=model_name, model_version=MODEL_VERSION, id=request.id)
    if mark_final:
        response.parameters[FINAL_RESPONSE].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=response)


def add_kserve_to_grpc_server(server: grpc.aio.Server, pipeline: Pipeline,
                              ready: ReadyCheck | None = None) -> KServeGrpcServicer:
    """Serve inference.GRPCInferenceService beside the frontend's other services.

    List SERVICE_NAME among the server's reflection names. ``ready`` overrides readiness
    (default: the router knows a healthy decode worker for the model).
    """
    servicer = KServeGrpcServicer(KServeFrontend(pipeline, ready))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer
