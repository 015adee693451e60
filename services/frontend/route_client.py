"""The frontend's side of routing: each request's Route goes over a long-lived RouteStream.

A message on an open stream costs about a third of a unary call's setup (0.25 against 0.6-0.8 ms a
round trip on a 2-core host), and Route is on every request's time to first token. A stream carries
one write at a time (each waits for the last to complete, about 1 ms on a 2-core host), so requests
that arrive together would queue behind each other's writes: the client opens up to MAX_STREAMS
streams as bursts need them and writes each request on one that is free.
When no stream is there (the router restarted, or is older and lacks RouteStream) a request falls
back to the unary Route, so a broken stream never fails a request that a unary call could route. A
stream that breaks before its first answer is not reopened for a while (1 s, doubling to 30 s), so a
router whose stream keeps failing costs each request one unary call, not a failed stream and then a
unary call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
import structlog

from tandem.errors import InvalidRequest, ResourceExhausted, Unavailable
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

log = structlog.get_logger(__name__)

Metadata = Sequence[tuple[str, str]]

STREAM_RETRY_S = (1.0, 30.0)  # first and longest pause after a stream broke before its first answer
# Streams open at once: a burst of this many requests writes its Routes side by side (four arriving
# together were routed over 2.9 ms on one stream, 2-core host).
MAX_STREAMS = 4
# The background Routes of predicted requests wait until no request was predicted for CHECK_QUIET_S
# (at most CHECK_MAX_DELAY_S after the first waiting one): written at once, each took the loop for
# ~0.2 ms between the intakes of a burst's requests, and the last one reached the worker that much later.
CHECK_QUIET_S = 0.002
CHECK_MAX_DELAY_S = 0.010


class _StreamGone(Exception):
    """The stream broke or closed before this call's answer came: route it with a unary call."""


class _Stream:
    """One RouteStream call, its reader task, and the answers still owed on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.reader: asyncio.Task[None] | None = None
        self.pending: dict[int, asyncio.Future[router_pb2.RouteStreamResponse]] = {}
        self.write_lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        return self.write_lock.locked()


class RouteClient:
    """Routes requests through ``stub``; one event loop only.

    Raises InvalidRequest (a bad field), ResourceExhausted (every worker is full) or Unavailable (no
    healthy worker, or the router cannot be reached).
    """

    def __init__(self, stub: router_pb2_grpc.RouterServiceStub, router_address: str,
                 max_streams: int = MAX_STREAMS) -> None:
        self._stub = stub
        self._router_address = router_address
        self._max_streams = max_streams
        self._streams: list[_Stream] = []
        self._call_ids = itertools.count(1)
        self._next = 0  # round robin over streams when every one is writing
        self._stream_supported = True  # False once the router answered UNIMPLEMENTED
        self._retry_pause_s = 0.0  # how long streams are left closed after one broke unanswered
        self._closed_until = 0.0  # loop time before which requests go unary

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    async def route(self, message: router_pb2.RouteRequest, metadata: Metadata,
                    timeout_s: float) -> router_pb2.RouteResponse:
        if self._stream_supported and (self._streams
                                       or asyncio.get_running_loop().time() >= self._closed_until):
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await self._over_stream(message)
            except _StreamGone:
                pass
            except TimeoutError:
                raise Unavailable(f"router {self._router_address}: DEADLINE_EXCEEDED: no answer within "
                                  f"{timeout_s} s") from None
            else:
                if answer.HasField("route"):
                    return answer.route
                raise self._refusal(answer.error)
        try:
            return await self._stub.Route(message, metadata=metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error_from_status(exc) from None

    async def close(self) -> None:
        streams, self._streams = self._streams, []
        for stream in streams:
            stream.call.cancel()
            if stream.reader is not None:
                stream.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.reader

    async def _over_stream(self, message: router_pb2.RouteRequest) -> router_pb2.RouteStreamResponse:
        stream = self._pick()
        call_id = next(self._call_ids)
        answer: asyncio.Future[router_pb2.RouteStreamResponse] = asyncio.get_running_loop().create_future()
        stream.pending[call_id] = answer
        try:
            try:
                async with stream.write_lock:
                    await stream.call.write(router_pb2.RouteStreamRequest(call_id=call_id, route=message))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                raise _StreamGone() from None  # the reader sees the same failure and drops the stream
            return await answer
        finally:
            stream.pending.pop(call_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # a stream that broke during the write failed this answer too: retrieved

    def _pick(self) -> _Stream:
        """A stream with no write in progress; a new one while fewer than max_streams are open; else
        the next in turn (the write waits there)."""
        self._streams = [s for s in self._streams if not s.call.done()]
        for stream in self._streams:
            if not stream.busy:
                return stream
        if len(self._streams) < self._max_streams:
            return self._open()
        self._next = (self._next + 1) % len(self._streams)
        return self._streams[self._next]

    def _open(self) -> _Stream:
        stream = _Stream(self._stub.RouteStream())
        stream.reader = asyncio.create_task(self._read(stream), name="route-stream-reader")
        self._streams.append(stream)
        return stream

    async def _read(self, stream: _Stream) -> None:
        """Hand each answer to its caller; when the stream ends, send every waiting caller to the unary path."""
        answered = False
        try:
            while (answer := await stream.call.read()) is not grpc.aio.EOF:
                if not answered:
                    answered, self._retry_pause_s = True, 0.0
                waiting = stream.pending.get(answer.call_id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._stream_supported = False
                log.info("the router has no RouteStream; routing with unary calls", router=self._router_address)
            elif exc.code() != grpc.StatusCode.CANCELLED:
                if answered:
                    log.info("route stream broke; reopening it on the next request", router=self._router_address,
                             code=exc.code().name)
                else:
                    first, longest = STREAM_RETRY_S
                    self._retry_pause_s = min(longest, self._retry_pause_s * 2 or first)
                    self._closed_until = asyncio.get_running_loop().time() + self._retry_pause_s
                    log.info("route stream broke before its first answer; routing with unary calls for a while",
                             router=self._router_address, code=exc.code().name, pause_s=self._retry_pause_s)
        finally:
            if stream in self._streams:
                self._streams.remove(stream)
            for waiting in list(stream.pending.values()):
                if not waiting.done():
                    waiting.set_exception(_StreamGone())

    def _error_from_status(self, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequest(exc.details() or "rejected by the router")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(exc.details() or "every worker is at capacity")
        # UNAVAILABLE from the router means no healthy worker; any other failure means the router
        # itself cannot answer: either way no worker can be reached.
        return Unavailable(f"router {self._router_address}: {code.name}: {exc.details()}")

    def _refusal(self, error: common_pb2.ErrorDetail) -> Exception:
        """A refusal inside the stream, as the same error a unary call's status gives."""
        if error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT:
            return InvalidRequest(error.message or "rejected by the router", error.field or None)
        if error.code == common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED:
            return ResourceExhausted(error.message or "every worker is at capacity", error.field or None)
        return Unavailable(f"router {self._router_address}: UNAVAILABLE: {error.message}")


class SoleWorker:
    """The router's word that one worker is the only one it could choose (RouteResponse.only_candidate).

    While that holds, a request need not wait for its Route, which costs two hops of its time to
    first token: it starts on that worker at once while its Route goes on in the background, so the
    router still counts it and the answer keeps this up to date. Any answer that says otherwise, a
    Route that fails and a worker that fails a request drop it; answers to Routes sent before a drop
    do not bring it back.
    """

    def __init__(self) -> None:
        self.route: router_pb2.RouteResponse | None = None
        self.epoch = 0  # bumped on every drop
        self._checks: set[asyncio.Task[router_pb2.RouteResponse]] = set()
        self._waiting: list[tuple[Coroutine[Any, Any, router_pb2.RouteResponse], router_pb2.RouteResponse, int,
                                  Callable[[], None]]] = []
        self._first_waiting_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def learn(self, route: router_pb2.RouteResponse, epoch: int) -> None:
        """Take an answer to a Route sent at ``epoch``."""
        if epoch != self.epoch:
            return
        if route.only_candidate and not route.HasField("prefill"):
            self.route = route
        elif self.route is not None:
            self.drop()

    def drop(self) -> None:
        self.route = None
        self.epoch += 1

    def check(self, routing: Coroutine[Any, Any, router_pb2.RouteResponse],
              on_mispredicted: Callable[[], None]) -> None:
        """Await, in the background, the Route of a request started on ``self.route``.

        The Route starts once requests stopped coming for CHECK_QUIET_S, after the caller has opened
        the request's Generate call: that message, and those of the requests right behind it, go
        out first and reach the worker a Route's worth of time earlier each.
        """
        predicted, epoch = self.route, self.epoch
        assert predicted is not None
        loop = asyncio.get_running_loop()
        if not self._waiting:
            self._first_waiting_at = loop.time()
        self._waiting.append((routing, predicted, epoch, on_mispredicted))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(min(loop.time() + CHECK_QUIET_S, self._first_waiting_at + CHECK_MAX_DELAY_S),
                                   self._start_waiting)

    def _start_waiting(self) -> None:
        waiting, self._waiting, self._timer = self._waiting, [], None
        for check in waiting:
            self._start(*check)

    def _start(self, routing: Coroutine[Any, Any, router_pb2.RouteResponse], predicted: router_pb2.RouteResponse,
               epoch: int, on_mispredicted: Callable[[], None]) -> None:
        if self._closed:
            routing.close()
            return
        task = asyncio.ensure_future(routing)
        self._checks.add(task)

        def done(task: asyncio.Task[router_pb2.RouteResponse]) -> None:
            self._checks.discard(task)
            if task.cancelled():
                return
            error = task.exception()
            answer = task.result() if error is None else None
            # The request went to the predicted worker, prefilling there: any other answer is a miss.
            if answer is None or answer.worker_id != predicted.worker_id or answer.HasField("prefill"):
                on_mispredicted()
                log.info("a predicted route did not hold; waiting for the router's answers again",
                         worker_id=predicted.worker_id, answer=str(error) if answer is None else answer.worker_id,
                         remote_prefill=answer is not None and answer.HasField("prefill"))
                if epoch == self.epoch:
                    self.drop()
                return
            self.learn(answer, epoch)

        task.add_done_callback(done)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._start_waiting()  # closed: each waiting Route is closed unsent
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
