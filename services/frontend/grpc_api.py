"""The native gRPC API (tandem.api.v1.GenerationService): text or token ids in, token deltas out."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc
import structlog
from aiohttp import web

from services.frontend.pipeline import GenerationRequest, Pipeline, is_valid_request_id
from services.frontend.wire import finish_reason_to_proto, sampling_from_proto
from tandem.errors import InvalidRequest, TandemError
from tandem.grpc_server import request_id_from_context
from tandem.proto.api.v1 import api_pb2, api_pb2_grpc
from tandem.proto.common.v1 import common_pb2
from tandem.telemetry.logging import REQUEST_ID_HEADER
from tandem.wire import logprob_to_proto

log = structlog.get_logger(__name__)

ENDPOINT = "native_generate"
_STATUS_FOR_CODE = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_status_for(error: TandemError) -> tuple[grpc.StatusCode, str]:
    """The status code and a message naming the field at fault, for any gRPC API of the frontend."""
    message = error.message
    if error.field and error.field not in message:
        message = f"{error.field}: {message}"
    return _STATUS_FOR_CODE.get(error.code, grpc.StatusCode.INTERNAL), message


class GenerationApi(api_pb2_grpc.GenerationServiceServicer):
    """Served on the frontend's gRPC port beside health, reflection and KServe."""

    service_names: Sequence[str] = (api_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,)

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def add_to_grpc_server(self, server: grpc.aio.Server) -> None:
        api_pb2_grpc.add_GenerationServiceServicer_to_server(self, server)

    def add_http_routes(self, app: web.Application) -> None:
        """This API has no HTTP side."""

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.GenerateResponse]:
        request_id = request.request_id or request_id_from_context(context) or f"gen-{uuid.uuid4().hex}"
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                if not is_valid_request_id(request_id):
                    raise InvalidRequest("request_id must be 1-128 printable ASCII characters", "request_id")
                generation = self._prepare(request, request_id)
            except TandemError as exc:
                self.pipeline.metrics.count_request(self.pipeline.model_name, ENDPOINT, "stream", exc.code)
                await context.abort(*grpc_status_for(exc))
            await context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
            try:
                # A client cancel cancels this task; leaving aclosing then cancels the worker call.
                async with aclosing(self.pipeline.generate(generation)) as outputs:
                    async for output in outputs:
                        response = api_pb2.GenerateResponse(
                            request_id=request_id,
                            delta=common_pb2.TokenDelta(token_ids=output.token_ids, text=output.text,
                                                        logprobs=[logprob_to_proto(lp) for lp in output.logprobs or ()]),
                            finish_reason=finish_reason_to_proto(output.finish_reason),
                            prompt_logprobs=[logprob_to_proto(lp) for lp in output.prompt_logprobs or ()],
                        )
                        if output.finished:
                            response.usage.CopyFrom(common_pb2.Usage(
                                prompt_tokens=output.num_prompt_tokens,
                                completion_tokens=output.num_output_tokens,
                                cached_prompt_tokens=output.num_cached_tokens,
                            ))
                        yield response
            except TandemError as exc:
                await context.abort(*grpc_status_for(exc))

    def _prepare(self, request: api_pb2.GenerateRequest, request_id: str) -> GenerationRequest:
        self.pipeline.check_model(request.model)
        prompt_kind = request.WhichOneof("prompt")
        if prompt_kind == "text":
            token_ids = self.pipeline.tokenize(request.text)
        elif prompt_kind == "token_ids":
            token_ids = list(request.token_ids.ids)
        else:
            raise InvalidRequest("a prompt is required: set text or token_ids", "prompt")
        sampling = sampling_from_proto(request.sampling)
        self.pipeline.validate_prompt(token_ids, sampling, prompt_kind)
        return GenerationRequest(request_id, token_ids, sampling, ENDPOINT, streaming=True)

    async def ListModels(  # noqa: N802 (gRPC method name)
        self, request: api_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListModelsResponse:
        return api_pb2.ListModelsResponse(models=[
            api_pb2.ModelInfo(name=self.pipeline.model_name, max_model_len=self.pipeline.max_model_len)
        ])
