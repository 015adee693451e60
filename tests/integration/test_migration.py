"""In-flight migration in the frontend pipeline against scripted router and worker gRPC servers:
a worker that breaks or stalls mid-stream hands its requests to another with nothing lost or repeated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from services.frontend.metrics import FrontendMetrics
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import SamplingParams
from tandem.errors import Unavailable
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

MODEL = "test-model"
PROMPT = [1, 2, 3]


class FakeTokenizer:
    """Token 10 + k reads " t<k>"; prompt tokens (< 10) read as nothing."""

    def __len__(self) -> int:
        return 1000

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{token_id - 10}" for token_id in token_ids if token_id >= 10)


@dataclass
class Router(router_pb2_grpc.RouterServiceServicer):
    workers: list[tuple[str, str]]
    routes: list[router_pb2.RouteRequest] = field(default_factory=list)
    reports: list[router_pb2.ReportWorkerFailureRequest] = field(default_factory=list)

    async def Route(self, request, context):  # noqa: N802
        self.routes.append(request)
        reported = {report.worker_id for report in self.reports}
        for worker_id, address in self.workers:
            if worker_id not in request.exclude_worker_ids and worker_id not in reported:
                return router_pb2.RouteResponse(worker_id=worker_id, address=address)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "no healthy worker")

    async def ReportWorkerFailure(self, request, context):  # noqa: N802
        self.reports.append(request)
        return router_pb2.ReportWorkerFailureResponse(quarantined=True)


class HangableHealth(health.aio.HealthServicer):
    """SERVING, until the whole process hangs (then nothing answers, as under SIGSTOP)."""

    def __init__(self) -> None:
        super().__init__()
        self.answering = asyncio.Event()
        self.answering.set()

    async def Check(self, request, context):  # noqa: N802
        await self.answering.wait()
        return await super().Check(request, context)


@dataclass
class Worker(worker_pb2_grpc.WorkerServiceServicer):
    """Continues the sequence 10, 11, 12, ... from wherever the prompt left it, like a greedy model."""

    break_after: int | None = None  # tokens streamed before it fails (UNAVAILABLE), hangs or pauses
    hang: bool = False  # the process hangs: no token, no health answer
    pause_s: float = 0.0  # the engine is slow once: no token for this long, health still answers
    prompts: list[list[int]] = field(default_factory=list)
    max_tokens: list[int] = field(default_factory=list)
    resumed: list[tuple[int, int, float]] = field(default_factory=list)  # (resumed outputs, min_tokens, penalty)
    health: HangableHealth = field(default_factory=HangableHealth)

    async def Generate(self, request, context) -> AsyncIterator[worker_pb2.GenerateResponse]:  # noqa: N802
        prompt = list(request.prompt_token_ids)
        self.prompts.append(prompt)
        self.max_tokens.append(request.sampling.max_tokens)
        self.resumed.append((request.num_resumed_output_tokens, request.sampling.min_tokens,
                             request.sampling.frequency_penalty))
        start = len(prompt) - len(PROMPT)
        for i in range(request.sampling.max_tokens):
            if self.break_after is not None and i == self.break_after:
                if self.hang:
                    self.health.answering.clear()
                    await asyncio.Event().wait()
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)
                else:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            await asyncio.sleep(0.001)
            k = start + i
            response = worker_pb2.GenerateResponse(delta=common_pb2.TokenDelta(token_ids=[10 + k], text=f" t{k}"))
            if request.sampling.HasField("logprobs"):
                response.delta.logprobs.add(token_id=10 + k, logprob=-k / 8)
            if i == request.sampling.max_tokens - 1:
                response.finish_reason = common_pb2.FINISH_REASON_LENGTH
                response.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=i + 1))
            yield response


@dataclass
class Mesh:
    router: Router
    workers: list[Worker]
    servers: list[grpc.aio.Server]
    router_address: str

    def pipeline(self, **kwargs: object) -> Pipeline:
        return Pipeline(model_name=MODEL, max_model_len=256, tokenizer=FakeTokenizer(),
                        router_address=self.router_address, metrics=FrontendMetrics(CollectorRegistry()),
                        **kwargs)  # type: ignore[arg-type]


async def _start(servicer: object, add: object, health_servicer: HangableHealth | None = None,
                 ) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(servicer, server)  # type: ignore[operator]
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    workers = [Worker(), Worker(), Worker()]
    servers, addresses = [], []
    for worker in workers:
        server, address = await _start(worker, worker_pb2_grpc.add_WorkerServiceServicer_to_server, worker.health)
        servers.append(server)
        addresses.append(address)
    router = Router([(f"w{i}", address) for i, address in enumerate(addresses)])
    router_server, router_address = await _start(router, router_pb2_grpc.add_RouterServiceServicer_to_server)
    yield Mesh(router, workers, [*servers, router_server], router_address)
    for server in [*servers, router_server]:
        await server.stop(0)


def _request(request_id: str, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(request_id, list(PROMPT), SamplingParams(max_tokens=max_tokens, temperature=0),
                             "completions", True)


async def _collect(pipeline: Pipeline, request: GenerationRequest) -> tuple[str, list[int], object]:
    text, tokens, last = "", [], None
    async with aclosing(pipeline.generate(request)) as outputs:
        async for output in outputs:
            text += output.text
            tokens += output.token_ids
            last = output
    return text, tokens, last


EXPECTED_TEXT = "".join(f" t{k}" for k in range(8))


async def test_a_broken_stream_continues_on_another_worker(mesh: Mesh) -> None:
    mesh.workers[0].break_after = 3
    pipeline = mesh.pipeline()
    text, tokens, last = await _collect(pipeline, _request("r1"))
    assert text == EXPECTED_TEXT and tokens == list(range(10, 18))
    assert last.num_prompt_tokens == 3 and last.num_output_tokens == 8  # type: ignore[attr-defined]
    # The second worker got the prompt plus the 3 streamed tokens, and only what is left to generate.
    assert mesh.workers[1].prompts == [[1, 2, 3, 10, 11, 12]] and mesh.workers[1].max_tokens == [5]
    assert list(mesh.router.routes[1].exclude_worker_ids) == ["w0"]
    assert list(mesh.router.routes[1].token_ids) == [1, 2, 3, 10, 11, 12]
    await asyncio.sleep(0.05)  # the failure report is sent without holding up the stream
    assert [(r.worker_id, r.kind) for r in mesh.router.reports] == [("w0", router_pb2.WORKER_FAILURE_KIND_UNREACHABLE)]
    registry = pipeline.metrics.registry
    assert registry.get_sample_value("tandem_frontend_migrations_total",
                                     {"model": MODEL, "reason": "unreachable"}) == 1
    await pipeline.close()


async def test_a_stalled_worker_loses_all_its_streams_at_once(mesh: Mesh) -> None:
    mesh.workers[0].break_after, mesh.workers[0].hang = 2, True
    mesh.router.workers = mesh.router.workers[:2]
    pipeline = mesh.pipeline(stall_timeout_s=0.3, stall_confirm_timeout_s=0.2)
    results = await asyncio.gather(*(_collect(pipeline, _request(f"r{i}")) for i in range(3)))
    assert all(text == EXPECTED_TEXT for text, _, _ in results)
    # One stream's timer fired and the worker did not answer its health check; the other two moved
    # with it (reason worker_stalled) instead of each waiting out its own timer and check.
    registry = pipeline.metrics.registry
    stalled = registry.get_sample_value("tandem_frontend_migrations_total", {"model": MODEL, "reason": "stalled"})
    others = registry.get_sample_value("tandem_frontend_migrations_total",
                                       {"model": MODEL, "reason": "worker_stalled"})
    assert (stalled, others) == (1, 2)
    assert registry.get_sample_value("tandem_frontend_failure_detection_seconds_count", {"kind": "stalled"}) == 1
    await pipeline.close()


async def test_each_migration_counts_towards_the_limit(mesh: Mesh) -> None:
    for worker in mesh.workers:
        worker.break_after = 2
    pipeline = mesh.pipeline(migration_limit=1)
    seen: list[str] = []
    with pytest.raises(Unavailable, match=r"migration limit \(1\)"):
        async with aclosing(pipeline.generate(_request("r1"))) as outputs:
            async for output in outputs:
                seen.append(output.text)
    assert "".join(seen) == " t0 t1 t2 t3"  # two from each worker, then a clear error, never a silent end
    assert pipeline.metrics.registry.get_sample_value("tandem_frontend_migration_failures_total",
                                                      {"model": MODEL}) == 1
    await pipeline.close()


async def test_no_worker_left_ends_the_stream_with_an_error(mesh: Mesh) -> None:
    mesh.workers[0].break_after = 1
    mesh.router.workers = mesh.router.workers[:1]
    pipeline = mesh.pipeline()
    with pytest.raises(Unavailable, match="after 1 tokens and no other worker can continue it"):
        await _collect(pipeline, _request("r1"))
    await pipeline.close()


async def test_a_slow_worker_that_answers_its_health_check_keeps_its_streams(mesh: Mesh) -> None:
    mesh.workers[0].break_after, mesh.workers[0].pause_s = 2, 0.5
    pipeline = mesh.pipeline(stall_timeout_s=0.2)
    text, _, _ = await _collect(pipeline, _request("r1"))
    assert text == EXPECTED_TEXT
    assert len(mesh.workers[0].prompts) == 1 and not mesh.workers[1].prompts  # never moved
    registry = pipeline.metrics.registry
    assert registry.get_sample_value("tandem_frontend_stall_false_alarms_total", {}) >= 1
    assert registry.get_sample_value("tandem_frontend_migrations_total", {"model": MODEL, "reason": "stalled"}) is None
    await pipeline.close()


async def test_a_moved_request_tells_the_next_worker_which_prompt_tokens_are_its_output(mesh: Mesh) -> None:
    # Penalties count the earlier output as output; min_tokens, like max_tokens, is what is left.
    mesh.workers[0].break_after = 3
    pipeline = mesh.pipeline()
    request = GenerationRequest("r1", list(PROMPT), SamplingParams(max_tokens=8, min_tokens=5, temperature=0,
                                                                   frequency_penalty=0.5, logprobs=0),
                                "completions", True)
    logprobs = []
    async with aclosing(pipeline.generate(request)) as outputs:
        text = ""
        async for output in outputs:
            text += output.text
            logprobs += output.logprobs or []
    assert text == EXPECTED_TEXT
    # Each token's logprob once, in order, across the move.
    assert [(e.token_id, e.logprob) for e in logprobs] == [(10 + k, -k / 8) for k in range(8)]
    assert mesh.workers[0].resumed == [(0, 5, 0.5)]
    assert mesh.workers[1].resumed == [(3, 2, 0.5)] and mesh.workers[1].max_tokens == [5]
    await pipeline.close()
