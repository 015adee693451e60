"""GenerateStream: many requests over one long-lived stream between a frontend and this worker.

Each request runs through ``WorkerServicer.serve``, as a Generate call's does. Its responses are
queued, and one writer sends whatever is queued as one message: the outputs one engine step made
for every request on the stream leave in one write, where separate calls cost a write each (and
the worker's event loop, which shares the interpreter lock with the step thread, the time of each).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import structlog

from tandem.grpc_server import bind_request_id
from tandem.proto.common.v1 import common_pb2
from tandem.proto.worker.v1 import worker_pb2
from tandem.wire import ERROR_CODE_BY_STATUS

if TYPE_CHECKING:
    from services.decode.servicer import WorkerServicer

log = structlog.get_logger("decode")

# A message grows to about this many bytes before the rest waits for the next one; only outputs
# with prompt log-probabilities are large (an ordinary token's output is well under 100 bytes).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_SMALL_OUTPUT_BYTES = 100


class GenerateSession:
    """One GenerateStream call: a reader of start and cancel actions, a task per request, one writer."""

    def __init__(self, servicer: WorkerServicer, context: grpc.aio.ServicerContext) -> None:
        self._servicer = servicer
        self._context = context
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._queued: list[worker_pb2.StreamOutput] = []
        self._wake = asyncio.Event()  # set when outputs are queued, a request ended or the reader did

    async def run(self, requests: AsyncIterator[worker_pb2.GenerateStreamRequest]) -> None:
        """Serve until the caller has closed its side and every request on the stream has ended.

        Cancelled (the caller left, the stream broke, the server stops): every request still
        running is cancelled, which aborts it in the engine and frees its KV blocks.
        """
        await self._context.send_initial_metadata(())  # the caller waits for this before its first request
        reader = asyncio.create_task(self._read(requests), name="generate-stream-reader")
        try:
            while not (reader.done() and not self._tasks and not self._queued):
                if not self._queued:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._context.write(self._next_message())
            await reader  # its failure, if any, is the call's
        finally:
            reader.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[worker_pb2.GenerateStreamRequest]) -> None:
        try:
            async for message in requests:
                for action in message.actions:
                    kind = action.WhichOneof("action")
                    if kind == "start":
                        self._start(action.stream_id, action.start)
                    elif kind == "cancel":
                        task = self._tasks.pop(action.stream_id, None)
                        if task is not None:
                            task.cancel()
        finally:
            self._wake.set()

    def _start(self, stream_id: int, request: worker_pb2.GenerateRequest) -> None:
        if stream_id in self._tasks:
            self._queue(worker_pb2.StreamOutput(stream_id=stream_id, refusal=common_pb2.ErrorDetail(
                code=common_pb2.ERROR_CODE_INVALID_ARGUMENT, field="stream_id",
                message=f"stream_id: {stream_id} is already running on this stream")))
            return
        self._tasks[stream_id] = asyncio.create_task(self._serve(stream_id, request), name=f"generate-{stream_id}")

    async def _serve(self, stream_id: int, request: worker_pb2.GenerateRequest) -> None:
        from services.decode.servicer import Refused  # the servicer imports this module

        log_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        bind_request_id(log_id)  # in this task's own context
        try:
            async for response in self._servicer.serve(request, log_id):
                self._queue(worker_pb2.StreamOutput(stream_id=stream_id, response=response))
        except Refused as refused:
            self._queue(worker_pb2.StreamOutput(stream_id=stream_id, refusal=common_pb2.ErrorDetail(
                code=ERROR_CODE_BY_STATUS.get(refused.code, common_pb2.ERROR_CODE_INTERNAL), message=refused.message,
                field=refused.field)))
        except Exception as error:  # a bug: this request fails, the others on the stream go on
            log.exception("generate failed on the stream")
            self._queue(worker_pb2.StreamOutput(stream_id=stream_id, refusal=common_pb2.ErrorDetail(
                code=common_pb2.ERROR_CODE_INTERNAL, message=f"the worker failed: {error}")))
        finally:
            if self._tasks.get(stream_id) is asyncio.current_task():
                del self._tasks[stream_id]
            self._wake.set()

    def _queue(self, output: worker_pb2.StreamOutput) -> None:
        self._queued.append(output)
        self._wake.set()

    def _next_message(self) -> worker_pb2.GenerateStreamResponse:
        """What is queued, up to about MAX_MESSAGE_BYTES (at least one output)."""
        size, count = 0, 0
        for output in self._queued:
            large = output.HasField("response") and len(output.response.prompt_logprobs) > 0
            size += output.ByteSize() if large else _SMALL_OUTPUT_BYTES
            if count and size > MAX_MESSAGE_BYTES:
                break
            count += 1
        outputs, self._queued = self._queued[:count], self._queued[count:]
        return worker_pb2.GenerateStreamResponse(outputs=outputs)
