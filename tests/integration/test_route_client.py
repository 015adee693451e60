"""The frontend's RouteClient against scripted routers: requests share RouteStreams, refusals come
back as the errors a unary Route gives, and a missing or broken stream falls back to unary calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from services.frontend import route_client
from services.frontend.route_client import RouteClient
from tandem.errors import InvalidRequest, Unavailable
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration


def _decide(request: router_pb2.RouteRequest) -> router_pb2.RouteStreamResponse:
    if not request.token_ids:
        return router_pb2.RouteStreamResponse(error=common_pb2.ErrorDetail(
            code=common_pb2.ERROR_CODE_INVALID_ARGUMENT, message="token_ids: empty", field="token_ids"))
    if request.model == "gone":
        return router_pb2.RouteStreamResponse(error=common_pb2.ErrorDetail(
            code=common_pb2.ERROR_CODE_UNAVAILABLE, message="no decode worker is registered"))
    return router_pb2.RouteStreamResponse(route=router_pb2.RouteResponse(worker_id=f"w-{request.request_id}",
                                                                         address="127.0.0.1:1"))


@dataclass
class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    with_stream: bool = True
    stream_fails: bool = False  # RouteStream raises before answering (INTERNAL or UNKNOWN to the client)
    end_stream_after: int | None = None  # end each stream (status OK) after this many answers
    num_unary: int = 0
    num_streams: int = 0
    num_streamed: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: stream answers wait

    def __post_init__(self) -> None:
        self.hold.set()

    async def Route(self, request, context):  # noqa: N802
        self.num_unary += 1
        answer = _decide(request)
        if answer.HasField("error"):
            code = (grpc.StatusCode.INVALID_ARGUMENT if answer.error.code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
                    else grpc.StatusCode.UNAVAILABLE)
            await context.abort(code, answer.error.message)
        return answer.route

    async def RouteStream(self, request_iterator, context) -> AsyncIterator[router_pb2.RouteStreamResponse]:  # noqa: N802
        if not self.with_stream:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        self.num_streams += 1
        if self.stream_fails:
            raise RuntimeError("scripted RouteStream failure")
        answered = 0
        async for message in request_iterator:
            await self.hold.wait()
            answer = _decide(message.route)
            answer.call_id = message.call_id
            self.num_streamed += 1
            yield answer
            answered += 1
            if self.end_stream_after is not None and answered >= self.end_stream_after:
                return


@pytest.fixture
async def started() -> AsyncIterator[tuple[ScriptedRouter, RouteClient]]:
    router = ScriptedRouter()
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    client = RouteClient(router_pb2_grpc.RouterServiceStub(channel), f"127.0.0.1:{port}")
    yield router, client
    await client.close()
    await channel.close()
    await server.stop(0)


def _request(request_id: str, model: str = "m", token_ids: tuple[int, ...] = (1, 2)) -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(request_id=request_id, model=model, token_ids=token_ids)


async def test_requests_one_after_another_share_one_stream(started: tuple[ScriptedRouter, RouteClient]) -> None:
    router, client = started
    for i in range(5):
        assert (await client.route(_request(f"r{i}"), (), 5)).worker_id == f"w-r{i}"
    assert (router.num_streams, router.num_streamed, router.num_unary) == (1, 5, 0)


async def test_a_burst_is_written_over_several_streams_and_each_gets_its_own_answer(
        started: tuple[ScriptedRouter, RouteClient]) -> None:
    # One stream takes one write at a time; a burst spreads over up to MAX_STREAMS of them.
    router, client = started
    answers = await asyncio.gather(*(client.route(_request(f"r{i}"), (), 5) for i in range(20)))
    assert [a.worker_id for a in answers] == [f"w-r{i}" for i in range(20)]
    assert (router.num_streams, router.num_streamed, router.num_unary) == (route_client.MAX_STREAMS, 20, 0)
    assert client.num_streams == route_client.MAX_STREAMS
    await asyncio.gather(*(client.route(_request(f"s{i}"), (), 5) for i in range(8)))
    assert router.num_streams == route_client.MAX_STREAMS  # open streams are reused, none added


async def test_refusals_in_the_stream_are_the_errors_a_unary_route_gives(
        started: tuple[ScriptedRouter, RouteClient]) -> None:
    router, client = started
    with pytest.raises(InvalidRequest, match="token_ids") as refused:
        await client.route(_request("bad", token_ids=()), (), 5)
    assert refused.value.field == "token_ids"
    with pytest.raises(Unavailable, match="no decode worker"):
        await client.route(_request("none", model="gone"), (), 5)
    assert (await client.route(_request("ok"), (), 5)).worker_id == "w-ok"  # the stream goes on
    assert (router.num_streams, router.num_unary) == (1, 0)


async def test_a_router_without_route_stream_is_called_unary(started: tuple[ScriptedRouter, RouteClient]) -> None:
    router, client = started
    router.with_stream = False
    for i in range(3):
        assert (await client.route(_request(f"r{i}"), (), 5)).worker_id == f"w-r{i}"
    assert router.num_unary == 3 and router.num_streamed == 0


async def test_a_stream_the_router_ends_costs_no_request(started: tuple[ScriptedRouter, RouteClient]) -> None:
    # A router shutting down ends its streams; requests waiting on it go unary, later ones reopen one.
    router, client = started
    router.end_stream_after = 1
    router.hold.clear()
    waiting = [asyncio.create_task(client.route(_request(f"r{i}"), (), 5)) for i in range(12)]
    await asyncio.sleep(0.1)
    router.hold.set()
    answers = await asyncio.gather(*waiting)
    assert [a.worker_id for a in answers] == [f"w-r{i}" for i in range(12)]
    streams = router.num_streams  # each answered one request before it ended; the rest went unary
    assert 1 <= streams <= route_client.MAX_STREAMS
    assert (router.num_streamed, router.num_unary) == (streams, 12 - streams)
    assert client.num_streams == 0
    assert (await client.route(_request("later"), (), 5)).worker_id == "w-later"
    assert router.num_streams == streams + 1


async def test_an_unanswered_route_times_out_as_unavailable(started: tuple[ScriptedRouter, RouteClient]) -> None:
    router, client = started
    router.hold.clear()
    with pytest.raises(Unavailable, match="no answer within 0.2 s"):
        await client.route(_request("slow"), (), 0.2)
    router.hold.set()
    assert (await client.route(_request("next"), (), 5)).worker_id == "w-next"  # a late answer is dropped


async def test_a_stream_that_fails_unanswered_is_not_reopened_for_every_request(
        started: tuple[ScriptedRouter, RouteClient], monkeypatch: pytest.MonkeyPatch) -> None:
    # A router whose RouteStream keeps failing would otherwise cost each request a failed stream
    # before its unary call.
    monkeypatch.setattr(route_client, "STREAM_RETRY_S", (0.3, 0.6))
    router, client = started
    router.stream_fails = True
    for i in range(5):
        assert (await client.route(_request(f"r{i}"), (), 5)).worker_id == f"w-r{i}"
    assert (router.num_streams, router.num_unary) == (1, 5)
    await asyncio.sleep(0.35)  # the pause is over: one more try, which fails and doubles the pause
    assert (await client.route(_request("again"), (), 5)).worker_id == "w-again"
    assert router.num_streams == 2
    router.stream_fails = False
    await asyncio.sleep(0.35)
    assert (await client.route(_request("paused"), (), 5)).worker_id == "w-paused"
    assert router.num_streams == 2  # still within the doubled pause
    await asyncio.sleep(0.3)
    for i in range(3):
        assert (await client.route(_request(f"s{i}"), (), 5)).worker_id == f"w-s{i}"
    assert (router.num_streams, router.num_streamed) == (3, 3)
