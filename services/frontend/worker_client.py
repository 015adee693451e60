"""The frontend's side of a decode worker: one request's outputs streamed from the worker the router
chose, and what a worker's refusals and broken streams mean to the frontend.

A request goes on the worker's GenerateStream (one long-lived stream a worker carries every request
of this frontend on) or, for a worker without it, a Generate call of its own. Every read passes the
stall detector, so a silent worker shows up as ``WorkerStreamBroken``, which the pipeline answers by
moving the request (see ``Pipeline._generate_migrating``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

import grpc

from services.frontend import failure_detection as failures
from services.frontend.failure_detection import (
    FailoverMetrics,
    StallDetector,
    StreamWatches,
    WorkerStreamBroken,
)
from services.frontend.wire import finish_reason_from_proto, sampling_to_proto
from services.frontend.worker_session import ERROR_FIELD_KEY, SessionCall, WorkerSessions
from tandem.engine.types import RequestOutput
from tandem.errors import InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable
from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc
from tandem.telemetry.logging import REQUEST_ID_HEADER
from tandem.wire import logprobs_from_proto

if TYPE_CHECKING:
    from services.frontend.pipeline import GenerationRequest

# Worker failures worth another worker: the request moves there (migration), tokens and all.
_REROUTE_CODES = {grpc.StatusCode.UNAVAILABLE: failures.UNREACHABLE, grpc.StatusCode.CANCELLED: failures.STREAM_BROKEN}
_FIELD_FROM_WIRE = {"prompt_token_ids": "prompt"}
_ERROR_FROM_DETAIL: dict[int, type[TandemError]] = {
    common_pb2.ERROR_CODE_INVALID_ARGUMENT: InvalidRequest,
    common_pb2.ERROR_CODE_NOT_FOUND: NotFound,
    common_pb2.ERROR_CODE_UNAVAILABLE: Unavailable,
    common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED: ResourceExhausted,
}


class WorkerClient:
    """Channels to the decode workers, their GenerateStreams and the stall detector over them."""

    def __init__(self, failover_metrics: FailoverMetrics, *, request_timeout_s: float | None,
                 stall_timeout_s: float | None, first_token_timeout_s: float | None,
                 stall_confirm_timeout_s: float, worker_streams: bool) -> None:
        self.request_timeout_s = request_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stalls = StallDetector(StreamWatches(stall_timeout_s, first_token_timeout_s), failover_metrics,
                                     self.channel, stall_confirm_timeout_s)
        # One GenerateStream to each worker carries its requests (None: a Generate call each).
        self._sessions = WorkerSessions(self.channel) if worker_streams else None

    async def close(self) -> None:
        if self._sessions is not None:
            await self._sessions.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def stream(self, request: GenerationRequest,
                     route: router_pb2.RouteResponse) -> AsyncGenerator[RequestOutput, None]:
        """``request``'s outputs from the worker ``route`` names; the last has finish_reason set.

        Raises the worker's refusals as tandem errors (InvalidRequest, ResourceExhausted, ...) and
        ``WorkerStreamBroken`` when the worker went away, gave up or fell silent. Closing the
        iterator before the end cancels the call: the worker aborts the request and frees its blocks.
        """
        message = worker_pb2.GenerateRequest(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            sampling=sampling_to_proto(request.sampling),
            # The router's choice of prefill worker, when it chose remote prefill.
            prefill=route.prefill if route.HasField("prefill") else None,
            num_resumed_output_tokens=request.num_resumed_output_tokens)
        call = self._call(route.address, message, request, stream=True)
        num_output_tokens = 0
        finished = False
        watch = self._stalls.open(route.address)
        try:
            while True:
                try:
                    response = await self._stalls.read(call, watch, started=num_output_tokens > 0)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED or not isinstance(call, SessionCall):
                        raise
                    # The worker lacks GenerateStream: the request never ran there; a call of its own.
                    call = self._call(route.address, message, request, stream=False)
                    continue
                if response is grpc.aio.EOF:
                    break
                if response.finish_reason == common_pb2.FINISH_REASON_ERROR:
                    if response.error.code == common_pb2.ERROR_CODE_UNAVAILABLE:
                        raise WorkerStreamBroken(f"the worker gave up: {response.error.message}",
                                                  failures.STREAM_BROKEN, watch.silent_for_s())
                    raise _error_from_detail(response.error)
                token_ids = list(response.delta.token_ids)
                num_output_tokens += len(token_ids)
                finish_reason = finish_reason_from_proto(response.finish_reason)
                output = RequestOutput(
                    request_id=request.request_id, token_ids=token_ids, text=response.delta.text,
                    finish_reason=finish_reason, num_prompt_tokens=len(request.prompt_token_ids),
                    num_output_tokens=num_output_tokens,
                    logprobs=(logprobs_from_proto(response.delta.logprobs)
                              if request.sampling.logprobs is not None else None),
                    prompt_logprobs=logprobs_from_proto(response.prompt_logprobs) if response.prompt_logprobs else None,
                )
                if response.HasField("usage"):
                    output.num_prompt_tokens = response.usage.prompt_tokens or output.num_prompt_tokens
                    output.num_output_tokens = response.usage.completion_tokens or num_output_tokens
                    output.num_cached_tokens = response.usage.cached_prompt_tokens
                if not token_ids and not output.text and finish_reason is None:
                    continue  # keep-alive or bookkeeping message: nothing for the client
                if finish_reason is not None:
                    finished = True
                yield output
                if finished:
                    return
        except grpc.aio.AioRpcError as exc:
            raise _error_from_status(exc, route, self.request_timeout_s, watch.silent_for_s()) from None
        finally:
            self._stalls.close(watch)
            # Unfinished (the client left, a failure): the worker aborts the request and frees its KV
            # blocks. A finished call ends with the worker's status right behind its last message; a
            # cancel would race it and cost both ends a reset stream (~55 us of the frontend's loop).
            if not finished:
                call.cancel()
        raise WorkerStreamBroken("the stream ended before the request finished", failures.STREAM_BROKEN,
                                  watch.silent_for_s())

    def _call(self, address: str, message: worker_pb2.GenerateRequest, request: GenerationRequest,
              stream: bool) -> SessionCall | grpc.aio.UnaryStreamCall:
        """The request on the worker's GenerateStream (``stream`` and the worker has it), or a Generate call."""
        call = self._sessions.start(address, message, self.request_timeout_s) if stream and self._sessions else None
        if call is not None:
            return call
        stub = worker_pb2_grpc.WorkerServiceStub(self.channel(address))
        return stub.Generate(message, metadata=request_metadata(request.request_id), timeout=self.request_timeout_s)


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """The gRPC metadata that carries a request's id to the router and the worker (and their logs)."""
    return ((REQUEST_ID_HEADER, request_id),)


def _error_from_detail(detail: common_pb2.ErrorDetail) -> TandemError:
    error_class = _ERROR_FROM_DETAIL.get(detail.code, TandemError)
    return error_class(detail.message or "the worker failed the request", detail.field or None)


def _error_field(exc: grpc.aio.AioRpcError) -> str | None:
    """The worker names the request field at fault in trailing metadata, as a GenerateRequest path
    ("sampling.max_tokens", "prompt_token_ids"); clients know them as "max_tokens", "prompt"."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_FIELD_KEY and isinstance(value, str) and value:
            return _FIELD_FROM_WIRE.get(value, value.removeprefix("sampling."))
    return None


def _error_from_status(exc: grpc.aio.AioRpcError, route: router_pb2.RouteResponse,
                       timeout_s: float | None, silent_for_s: float) -> Exception:
    code, details = exc.code(), exc.details() or ""
    field = _error_field(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details, field)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details or f"worker {route.worker_id} is at capacity", field)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the request did not finish within {timeout_s} s")
    if code in _REROUTE_CODES:
        return WorkerStreamBroken(f"{code.name}: {details}", _REROUTE_CODES[code], silent_for_s)
    return TandemError(f"worker {route.worker_id} failed ({code.name}): {details}")
