"""What the gRPC and HTTP KServe endpoints share: preparing a request through the Pipeline,
running it to one whole completion or a stream of deltas, and readiness."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from services.frontend.kserve.codec import ParameterValue, Tensor
from services.frontend.kserve.model import check_version
from services.frontend.kserve.requests import KServeRequest, build_outputs, parse_request
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import FinishReason
from tandem.errors import InvalidRequest, NotFound, TandemError

ReadyCheck = Callable[[], Awaitable[bool]]

@dataclass(slots=True)
class Prepared:
    """A validated request: what the client asked for and what the pipeline will run."""

    kserve: KServeRequest
    generation: GenerationRequest


@dataclass(slots=True)
class Chunk:
    """One response's worth of output, ready to be encoded for gRPC or HTTP."""

    tensors: list[Tensor]
    final: bool


class KServeFrontend:
    """The KServe view of one Pipeline; both transports call it."""

    def __init__(self, pipeline: Pipeline, ready: ReadyCheck | None = None) -> None:
        self.pipeline = pipeline
        self._ready = ready

    @property
    def model_name(self) -> str:
        return self.pipeline.model_name

    async def ready(self) -> bool:
        """Ready to serve: a decode worker can take the model's requests."""
        if self._ready is not None:
            return await self._ready()
        return await self.pipeline.num_healthy_workers() > 0

    def check_model(self, model_name: str, version: str = "") -> None:
        """Raise NotFound unless the name (and version, if given) is the served model's."""
        if not model_name:
            raise NotFound("a model name is required", "model_name")
        self.pipeline.check_model(model_name)
        reason = check_version(model_name, version)
        if reason is not None:
            raise NotFound(reason, "model_version")

    def prepare(
        self,
        *,
        model_name: str,
        version: str,
        tensors: Mapping[str, Tensor],
        parameters: Mapping[str, ParameterValue],
        requested_outputs: Sequence[str],
        endpoint: str,
        streaming_endpoint: bool,
        request_id: str | None = None,
    ) -> Prepared:
        """Validate and tokenise; a failure is counted in the metrics and re-raised.

        Unary endpoints answer once, so stream=true there is a mistake worth reporting.
        ``request_id``: the client's x-request-id, followed across services; default a fresh one.
        """
        try:
            self.check_model(model_name, version)
            kserve = parse_request(tensors, parameters, requested_outputs, self.model_name)
            if kserve.stream and not streaming_endpoint:
                raise InvalidRequest(f"stream=true needs a streaming endpoint; {endpoint} returns the "
                                     "whole completion", "stream")
            token_ids = self.pipeline.tokenize(kserve.prompt)
            self.pipeline.validate_prompt(token_ids, kserve.sampling, field="text_input")
        except TandemError as exc:
            self.count_rejected(endpoint, parameters, exc, tensors)
            raise
        generation = GenerationRequest(
            request_id=request_id or f"kserve-{uuid.uuid4().hex}", prompt_token_ids=token_ids, sampling=kserve.sampling,
            endpoint=endpoint, streaming=kserve.stream,
        )
        return Prepared(kserve, generation)

    def count_rejected(self, endpoint: str, parameters: Mapping[str, ParameterValue], error: TandemError,
                       tensors: Mapping[str, Tensor] | None = None) -> None:
        """Count a request that failed before reaching the pipeline (which counts the rest)."""
        request_type = "stream" if _asks_for_stream(tensors or {}, parameters) else "unary"
        self.pipeline.metrics.count_request(self.model_name, endpoint, request_type, error.code)

    async def complete(self, prepared: Prepared) -> list[Tensor]:
        """Run to the end and return the whole completion's output tensors."""
        async for chunk in self.run(prepared, stream=False):
            return chunk.tensors
        raise TandemError("the request ended without output")  # run() always yields once

    async def run(self, prepared: Prepared, *, stream: bool) -> AsyncGenerator[Chunk, None]:
        """``stream``: one chunk per token delta; else one chunk with the whole text.

        The last chunk has final=True. Pipeline errors (Unavailable, ...) propagate.
        """
        request = prepared.kserve
        pieces: list[str] = []
        finish_reason: FinishReason | None = None
        num_prompt_tokens = len(prepared.generation.prompt_token_ids)
        num_output_tokens = 0
        async with aclosing(self.pipeline.generate(prepared.generation)) as outputs:
            async for output in outputs:
                num_prompt_tokens = output.num_prompt_tokens or num_prompt_tokens
                if stream:
                    yield Chunk(build_outputs(request, output.text, output.finish_reason, num_prompt_tokens,
                                              len(output.token_ids)), final=output.finished)
                else:
                    pieces.append(output.text)
                    num_output_tokens = output.num_output_tokens
                finish_reason = output.finish_reason or finish_reason
                if output.finished:
                    break
        if finish_reason is None:
            raise TandemError("the generation stream ended before the request finished")
        if not stream:
            text = "".join(pieces)
            if request.prepend_input:
                text = request.prompt + text
            yield Chunk(build_outputs(request, text, finish_reason, num_prompt_tokens, num_output_tokens),
                        final=True)


def _asks_for_stream(tensors: Mapping[str, Tensor], parameters: Mapping[str, ParameterValue]) -> bool:
    """The metrics label, before the request is validated (so a best effort)."""
    stream = tensors.get("stream")
    if stream is not None and stream.values:
        return bool(stream.values[0])
    return parameters.get("stream") is True
