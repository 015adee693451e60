"""The frontend's side of GenerateStream: one long-lived stream to each worker carries every request
the frontend sends there.

A request on it costs a message, not a call (a unary-stream call's setup took ~0.3 ms of the
frontend's loop and more of the worker's), and the worker sends one step's outputs for all of them
in one message, which one read here hands to each request. A request on the stream reads like a
Generate call (``SessionCall``): its responses, then EOF; a refusal or the stream's own failure
raises the grpc.aio.AioRpcError the call would have raised, so callers handle both alike. A worker
that lacks GenerateStream answers UNIMPLEMENTED: that request (which never ran) and every later one
for the worker go through Generate instead.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable

import grpc
import structlog

from tandem.proto.common.v1 import common_pb2
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc
from tandem.wire import STATUS_BY_ERROR_CODE

log = structlog.get_logger(__name__)

ERROR_FIELD_KEY = "tandem-error-field"  # where a Generate call's trailing metadata names the bad field
_EOF = object()


def rpc_error(code: grpc.StatusCode, details: str, field: str = "") -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((ERROR_FIELD_KEY, field)) if field else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


class SessionCall:
    """One request on a worker's stream, read like a Generate call; one reader at a time."""

    def __init__(self, session: WorkerSession, stream_id: int, timeout_s: float | None) -> None:
        self._session = session
        self.stream_id = stream_id
        self._items: deque[object] = deque()  # responses, then _EOF or an AioRpcError
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # its last item is queued (or it was cancelled): nothing more comes
        self._deadline = (asyncio.get_running_loop().call_later(timeout_s, self._expire, timeout_s)
                          if timeout_s else None)

    async def read(self) -> worker_pb2.GenerateResponse | object:
        """The next response, grpc.aio.EOF after the last; raises the request's failure."""
        if not self._items:
            if self._ended:
                return grpc.aio.EOF
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:  # as a Generate call's read: a cancelled read cancels the request
                self.cancel()
                raise
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is _EOF:
            return grpc.aio.EOF
        if isinstance(item, grpc.aio.AioRpcError):
            raise item
        return item

    def cancel(self) -> bool:
        """Abort the request on the worker (its KV blocks are freed); False once it had ended."""
        if self._ended:
            return False
        self._end(_EOF)
        self._session.cancel(self.stream_id)
        return True

    def done(self) -> bool:
        return self._ended

    def deliver(self, item: object) -> None:
        """A response, or the end: _EOF or an AioRpcError (called by the session's reader)."""
        if self._ended:
            return
        if isinstance(item, worker_pb2.GenerateResponse):
            self._push(item)
            if item.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                self._end(_EOF)
        else:
            self._end(item)

    def _end(self, last: object) -> None:
        self._ended = True
        if self._deadline is not None:
            self._deadline.cancel()
        self._push(last)

    def _push(self, item: object) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self, timeout_s: float) -> None:
        if not self._ended:
            self._session.cancel(self.stream_id)
            self._end(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {timeout_s} s"))


class WorkerSession:
    """One GenerateStream call to one worker, its reader and its writer; one event loop only."""

    def __init__(self, stub: worker_pb2_grpc.WorkerServiceStub, address: str,
                 on_unsupported: Callable[[str], None]) -> None:
        self.address = address
        self._call = stub.GenerateStream()
        self._on_unsupported = on_unsupported
        self._calls: dict[int, SessionCall] = {}
        self._stream_ids = itertools.count(1)
        self._outbox: list[worker_pb2.StreamAction] = []
        self._wake = asyncio.Event()
        self.closed = False
        self._reader = asyncio.create_task(self._read(), name=f"worker-stream-reader-{address}")
        self._writer = asyncio.create_task(self._write(), name=f"worker-stream-writer-{address}")

    def start(self, request: worker_pb2.GenerateRequest, timeout_s: float | None) -> SessionCall:
        call = SessionCall(self, next(self._stream_ids), timeout_s)
        self._calls[call.stream_id] = call
        self._send(worker_pb2.StreamAction(stream_id=call.stream_id, start=request))
        return call

    def cancel(self, stream_id: int) -> None:
        if self._calls.pop(stream_id, None) is not None and not self.closed:
            self._send(worker_pb2.StreamAction(stream_id=stream_id, cancel=worker_pb2.CancelGeneration()))

    async def close(self) -> None:
        """Cancel the stream (and so every request on it) and wait for the reader and writer."""
        self._call.cancel()
        for task in (self._writer, self._reader):
            task.cancel()
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)

    def _send(self, action: worker_pb2.StreamAction) -> None:
        self._outbox.append(action)
        self._wake.set()

    async def _write(self) -> None:
        """Whatever actions are queued go as one message; one write at a time, as a stream takes them.

        Nothing is written before the worker's headers: a worker without GenerateStream then ends
        the call cleanly with UNIMPLEMENTED (a request written into its refusal could end it INTERNAL).
        """
        try:
            await self._call.initial_metadata()
            while True:
                if not self._outbox:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                actions, self._outbox = self._outbox, []
                await self._call.write(worker_pb2.GenerateStreamRequest(actions=actions))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the call is over: the reader ends every request with its status

    async def _read(self) -> None:
        ending: object = _EOF  # the worker ended the stream: its requests ended unfinished
        try:
            while (message := await self._call.read()) is not grpc.aio.EOF:
                for output in message.outputs:
                    call = self._calls.get(output.stream_id)
                    if call is None:
                        continue  # cancelled here meanwhile
                    if output.HasField("refusal"):
                        del self._calls[output.stream_id]
                        refusal = output.refusal
                        call.deliver(rpc_error(STATUS_BY_ERROR_CODE.get(refusal.code, grpc.StatusCode.INTERNAL),
                                               refusal.message, refusal.field))
                        continue
                    call.deliver(output.response)
                    if call.done():
                        del self._calls[output.stream_id]
        except grpc.aio.AioRpcError as error:
            ending = error
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("worker has no GenerateStream; using a Generate call per request", address=self.address)
                self._on_unsupported(self.address)
            elif error.code() != grpc.StatusCode.CANCELLED or not self._calls:
                log.info("worker stream ended", address=self.address, code=error.code().name,
                         num_requests=len(self._calls))
        finally:
            self.closed = True
            calls, self._calls = self._calls, {}
            for call in calls.values():
                call.deliver(ending)
            self._writer.cancel()


class WorkerSessions:
    """A stream to each worker, opened on its first request and again after one ends."""

    def __init__(self, channel_for: Callable[[str], grpc.aio.Channel]) -> None:
        self._channel_for = channel_for
        self._sessions: dict[str, WorkerSession] = {}
        self._unary_only: set[str] = set()

    def start(self, address: str, request: worker_pb2.GenerateRequest,
              timeout_s: float | None) -> SessionCall | None:
        """The request started on ``address``'s stream; None for a worker that lacks GenerateStream."""
        if address in self._unary_only:
            return None
        session = self._sessions.get(address)
        if session is None or session.closed:
            session = WorkerSession(worker_pb2_grpc.WorkerServiceStub(self._channel_for(address)), address,
                                    self._unary_only.add)
            self._sessions[address] = session
        return session.start(request, timeout_s)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions))
