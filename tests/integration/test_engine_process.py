"""The hf engine in a child process (EngineProcess) with the real model: the same tokens as in-process,
refusals before the first output, aborts that free blocks, step metrics, and a dead child noticed."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tandem import lifecycle
from tandem.engine.config import EngineConfig
from tandem.engine.hf.engine import HFEngine
from tandem.engine.process import EngineProcess
from tandem.engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams, StepInfo
from tandem.errors import InvalidRequest
from tests.settings import TEST_DEVICE

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def _config(model_path: Path) -> EngineConfig:
    return EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=128, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def steps() -> list[StepInfo]:
    return []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path, steps: list[StepInfo]) -> AsyncIterator[EngineProcess]:
    eng = EngineProcess(_config(model_path), on_step=steps.append)
    await eng.start()
    yield eng
    await eng.shutdown()


async def run(engine: EngineProcess | HFEngine, rid: str, ids: list[int], **sampling: object) -> list[RequestOutput]:
    return [out async for out in engine.generate(EngineRequest(rid, ids, SamplingParams(**sampling)))]  # type: ignore[arg-type]


async def blocks_used_settle(engine: EngineProcess, expected: int = 0) -> int:
    for _ in range(100):  # stats come with each batch and every 50 ms
        if engine.stats().num_kv_blocks_used == expected and engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    return engine.stats().num_kv_blocks_used


async def test_greedy_tokens_match_the_in_process_engine(engine: EngineProcess, model_path: Path) -> None:
    prompt = list(range(100, 140))
    child = await run(engine, "p-greedy", prompt, max_tokens=12, temperature=0, ignore_eos=True)
    local = HFEngine(_config(model_path))
    await local.start()
    try:
        here = await run(local, "l-greedy", prompt, max_tokens=12, temperature=0, ignore_eos=True)
    finally:
        await local.shutdown()
    assert [t for o in child for t in o.token_ids] == [t for o in here for t in o.token_ids]
    assert "".join(o.text for o in child) == "".join(o.text for o in here)
    assert child[-1].finish_reason == FinishReason.LENGTH and child[-1].num_output_tokens == 12
    assert engine.model_name == local.model_name and engine.max_model_len == 256


async def test_the_child_runs_the_event_loop_every_tandem_process_runs(engine: EngineProcess) -> None:
    # uvloop unless TANDEM_EVENT_LOOP says otherwise; the child once ran the stdlib loop regardless.
    assert engine.child_event_loop == lifecycle.event_loop_name()


async def test_concurrent_requests_share_steps_and_report_them(engine: EngineProcess, steps: list[StepInfo]) -> None:
    steps.clear()
    results = await asyncio.gather(*(run(engine, f"p-batch-{i}", [200 + i] * 20, max_tokens=8, temperature=0,
                                         ignore_eos=True) for i in range(4)))
    assert all(r[-1].num_output_tokens == 8 for r in results)
    assert steps and max(step.num_seqs for step in steps) >= 2  # the child's forward passes reach on_step
    assert await blocks_used_settle(engine) == 0


async def test_a_prompt_too_long_is_refused_before_any_output(engine: EngineProcess) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await run(engine, "p-long", list(range(300)), max_tokens=4)
    assert refused.value.field == "prompt"
    assert "256" in refused.value.message
    outs = await run(engine, "p-after", [5, 6, 7], max_tokens=3, temperature=0, ignore_eos=True)
    assert outs[-1].num_output_tokens == 3  # the engine goes on serving


async def test_leaving_a_stream_early_aborts_it_and_frees_its_blocks(engine: EngineProcess) -> None:
    stream = engine.generate(EngineRequest("p-leave", list(range(50, 90)), SamplingParams(max_tokens=500,
                                                                                          ignore_eos=True)))
    first = await anext(stream)
    assert first.token_ids
    await stream.aclose()
    assert await blocks_used_settle(engine) == 0


async def test_a_killed_engine_process_fails_its_requests_and_reports_unhealthy(model_path: Path) -> None:
    eng = EngineProcess(_config(model_path))
    await eng.start()
    try:
        assert eng.healthy()
        stream = eng.generate(EngineRequest("p-kill", [1, 2, 3], SamplingParams(max_tokens=10_000, ignore_eos=True)))
        await anext(stream)
        assert eng._process is not None and eng._process.pid is not None
        os.kill(eng._process.pid, signal.SIGKILL)
        rest = [out async for out in stream]
        assert rest[-1].finish_reason == FinishReason.ERROR and "engine process" in (rest[-1].error or "")
        assert not eng.healthy()
        with pytest.raises(RuntimeError):
            await run(eng, "p-after-kill", [1, 2], max_tokens=2)
    finally:
        await eng.shutdown()


async def test_a_decode_worker_serves_through_its_engine_process(model_path: Path) -> None:
    import grpc

    from services.decode.config import DecodeConfig
    from services.decode.server import serve
    from tandem.proto.common.v1 import common_pb2
    from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

    worker = await serve(DecodeConfig(host="127.0.0.1", port=0, metrics_port=0, model=str(model_path), num_threads=1,
                                      num_kv_blocks=64, max_model_len=64, engine_process=True))
    try:
        assert isinstance(worker.engine, EngineProcess) and worker.remote_prefill is None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
            replies = [r async for r in stub.Generate(worker_pb2.GenerateRequest(
                request_id="w-1", prompt_token_ids=list(range(10, 30)), sampling=sampling))]
            assert sum(len(r.delta.token_ids) for r in replies) == 6
            assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Generate(worker_pb2.GenerateRequest(
                        request_id="w-2", prompt_token_ids=list(range(100)), sampling=sampling)):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "64" in (refused.value.details() or "")
            steps = worker.metrics.registry.get_sample_value("tandem_worker_step_duration_seconds_count") or 0
            assert steps >= 6  # the child's forward passes reach the worker's metrics
            for _ in range(100):
                stats = await stub.GetStats(worker_pb2.GetStatsRequest())
                if stats.load.num_running == 0:
                    break
                await asyncio.sleep(0.02)
            assert stats.load.num_kv_blocks_used == 0 and stats.model == worker.engine.model_name
            assert stats.max_model_len == 64
    finally:
        await worker.stop(drain_timeout_s=1)


async def test_a_killed_worker_leaves_no_engine_process_behind(model_path: Path) -> None:
    import time

    import psutil

    from tandem import procs

    port = procs.free_port()
    worker = procs.spawn("decode", ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                                    "--model", str(model_path), "--num-threads", "1", "--num-kv-blocks", "32",
                                    "--engine-process", "1"])
    try:
        deadline = time.monotonic() + 120
        while not procs.grpc_serving(f"127.0.0.1:{port}"):
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
            await asyncio.sleep(0.2)
        children = psutil.Process(worker.pid).children()
        engines = [c for c in children if c.name() == "tandem-engine"]
        assert len(engines) == 1  # named for ps and top
        worker.kill()  # no clean-up in the worker: the engine process must notice on its own
        worker.wait(10)
        gone, alive = psutil.wait_procs(engines, timeout=15)
        assert not alive, "the engine process outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
