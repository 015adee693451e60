"""Real router, two real decode workers (a counting engine in place of a model) and the real frontend
pipeline and HTTP API: drain hand-off by migration, and overload answered 503 + Retry-After."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.decode.server import serve as serve_decode
from services.frontend.metrics import FrontendMetrics
from services.frontend.openai_http import OpenAIHttpApi, create_app
from services.frontend.pipeline import GenerationRequest, Pipeline
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router
from tandem.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput, SamplingParams

pytestmark = pytest.mark.integration

PROMPT = [1, 2, 3]
STEP_S = 0.02


class CountingEngine:
    """Continues 10, 11, 12, ... from where the prompt stops, one token per step, like a greedy model."""

    model_name = "m"
    max_model_len = 512

    def __init__(self, config: object, on_step: object) -> None:
        self.running = 0
        self.dead = False  # die(): every request ends in error, as a failed step ends them

    async def start(self) -> None:
        pass

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        start = len(request.prompt_token_ids) - len(PROMPT)
        max_tokens = request.sampling.max_tokens or 8
        self.running += 1
        try:
            for i in range(max_tokens):
                await asyncio.sleep(STEP_S)
                if self.dead:
                    yield RequestOutput(request.request_id, [], "", FinishReason.ERROR, len(request.prompt_token_ids),
                                        i, error="engine failure: CUDA error: an illegal memory access")
                    return
                k = start + i
                reason = FinishReason.LENGTH if i == max_tokens - 1 else None
                yield RequestOutput(request.request_id, [10 + k], f" t{k}", reason,
                                    len(request.prompt_token_ids), i + 1)
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_running=self.running, num_kv_blocks_total=64, num_free_queue_slots=8)

    def healthy(self) -> bool:
        return not self.dead

    def die(self) -> None:
        self.dead = True

    async def shutdown(self) -> None:
        pass


class Tokenizer:
    def __len__(self) -> int:
        return 1000

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{token_id - 10}" for token_id in token_ids if token_id >= 10)


@pytest.fixture
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0, policy="round-robin"))
    yield running
    await running.stop(grace_s=0)


@pytest.fixture
async def workers(tmp_path: Path, router: RunningRouter) -> AsyncIterator[list[DecodeWorker]]:
    (tmp_path / "config.json").write_text("{}")
    running = []
    for i in range(2):
        config = DecodeConfig(host="127.0.0.1", port=0, metrics_port=0, router_address=router.address,
                              model=str(tmp_path), worker_id=f"w{i}")
        worker = await serve_decode(config, engine_factory=CountingEngine)  # type: ignore[arg-type]
        assert worker.registration is not None
        await worker.registration.wait_registered(5)
        running.append(worker)
    yield running
    for worker in running:
        await worker.stop(drain_timeout_s=0)


def pipeline(router: RunningRouter, **kwargs: object) -> Pipeline:
    return Pipeline(model_name="m", max_model_len=512, tokenizer=Tokenizer(), router_address=router.address,
                    metrics=FrontendMetrics(CollectorRegistry()), **kwargs)  # type: ignore[arg-type]


MAX_TOKENS = 30


async def four_streams_through(frontend: Pipeline, fault: Callable[[], Awaitable[object]]) -> list[str]:
    """Four streams of MAX_TOKENS tokens; ``fault()`` once every one has a few. Their texts."""
    texts = [""] * 4
    progress = [0] * 4
    flowing = asyncio.Event()  # every stream has a few tokens

    async def one(i: int) -> None:
        request = GenerationRequest(f"r{i}", list(PROMPT), SamplingParams(max_tokens=MAX_TOKENS), "completions",
                                    True)
        async with aclosing(frontend.generate(request)) as outputs:
            async for output in outputs:
                texts[i] += output.text
                progress[i] += len(output.token_ids)
                if min(progress) >= 3:
                    flowing.set()

    tasks = [asyncio.create_task(one(i)) for i in range(4)]
    await asyncio.wait_for(flowing.wait(), 10)
    await fault()
    await asyncio.gather(*tasks)
    return texts


def migrations(frontend: Pipeline, reason: str) -> float:
    return frontend.metrics.registry.get_sample_value(
        "tandem_frontend_migrations_total", {"model": "m", "reason": reason}) or 0


async def test_a_worker_whose_drain_times_out_hands_its_requests_over(
        router: RunningRouter, workers: list[DecodeWorker]) -> None:
    frontend = pipeline(router)
    # Scale-down with a drain too short for the requests: they are cancelled, and move.
    texts = await four_streams_through(frontend, lambda: workers[0].stop(drain_timeout_s=0.05))
    assert texts == ["".join(f" t{k}" for k in range(MAX_TOKENS))] * 4
    # round-robin put two requests on the stopped worker
    assert migrations(frontend, "stream_broken") + migrations(frontend, "unreachable") == 2
    await frontend.close()


async def test_requests_on_a_worker_whose_engine_fails_move_on_without_losing_a_token(
        router: RunningRouter, workers: list[DecodeWorker]) -> None:
    frontend = pipeline(router)

    async def engine_fails() -> None:
        workers[0].engine.die()  # type: ignore[attr-defined]

    texts = await four_streams_through(frontend, engine_fails)
    assert texts == ["".join(f" t{k}" for k in range(MAX_TOKENS))] * 4  # no error, no token lost or doubled
    assert migrations(frontend, "stream_broken") == 2  # round-robin had put two requests on the failed worker
    await asyncio.wait_for(workers[0].failed.wait(), 5)  # and that worker's process is on its way out
    await frontend.close()


async def test_a_full_frontend_queue_answers_503_with_retry_after(
        router: RunningRouter, workers: list[DecodeWorker]) -> None:
    frontend = pipeline(router, max_inflight_requests=1, max_queued_requests=0)
    app = create_app(OpenAIHttpApi(frontend))
    async with TestClient(TestServer(app)) as client:
        body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 20, "stream": True}
        first = await client.post("/v1/completions", json=body)  # holds the only slot while it streams
        assert first.status == 200
        refused = await client.post("/v1/completions", json={**body, "stream": False})
        assert refused.status == 503 and int(refused.headers["Retry-After"]) >= 1
        error = (await refused.json())["error"]
        assert error["code"] == "overloaded" and "capacity" in error["message"]
        lines = [line for line in (await first.text()).splitlines() if line.startswith("data: {")]
        assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines) == "".join(
            f" t{k}" for k in range(20))
        # The slot is free again.
        again = await client.post("/v1/completions", json={**body, "stream": False})
        assert again.status == 200
    assert frontend.metrics.registry.get_sample_value(
        "tandem_frontend_requests_rejected_overload_total", {"model": "m", "reason": "queue_full"}) == 1
    await frontend.close()
