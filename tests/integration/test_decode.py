"""A real decode worker (HFEngine, real model) on port 0 in-process, registered with an in-process router:
Generate calls, and many requests over one GenerateStream."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker, serve
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router
from tandem.proto.common.v1 import common_pb2
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MAX_MODEL_LEN = 32


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router() -> AsyncIterator[RunningRouter]:
    running = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
    yield running
    await running.stop(grace_s=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(model_path: Path, router: RunningRouter) -> AsyncIterator[DecodeWorker]:
    config = DecodeConfig(
        host="127.0.0.1", port=0, metrics_port=0, router_address=router.address, model=str(model_path),
        num_threads=1, num_kv_blocks=32, max_model_len=MAX_MODEL_LEN, max_num_seqs=4, max_queue_len=4,
    )
    running = await serve(config)
    yield running
    await running.stop(drain_timeout_s=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(worker: DecodeWorker) -> AsyncIterator[worker_pb2_grpc.WorkerServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def generate_request(token_ids: list[int], request_id: str = "req", **sampling: Any) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=token_ids,
                                      sampling=common_pb2.SamplingParams(**sampling))


async def stats(stub: worker_pb2_grpc.WorkerServiceStub) -> worker_pb2.GetStatsResponse:
    return await stub.GetStats(worker_pb2.GetStatsRequest())


async def test_serving_once_the_model_is_loaded(worker: DecodeWorker) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tandem.worker.v1.WorkerService"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_greedy_stream_matches_transformers(stub: worker_pb2_grpc.WorkerServiceStub, model_path: Path,
                                                  tokenizer: Any, worker: DecodeWorker) -> None:
    from transformers import AutoModelForCausalLM

    prompt = tokenizer("The capital of France is")["input_ids"]
    responses = [r async for r in stub.Generate(generate_request(prompt, max_tokens=8, temperature=0.0))]
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert [t for r in responses for t in r.delta.token_ids] == expected
    assert "".join(r.delta.text for r in responses) == tokenizer.decode(expected)
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 8)
    assert worker.metrics.requests.labels(outcome="length")._value.get() >= 1
    assert (worker.metrics.registry.get_sample_value("tandem_worker_step_batch_size_count") or 0) >= 8


async def test_unset_max_tokens_runs_until_the_context_is_full(stub: worker_pb2_grpc.WorkerServiceStub,
                                                               tokenizer: Any) -> None:
    prompt = tokenizer("Count: 1, 2, 3,")["input_ids"]
    request = worker_pb2.GenerateRequest(
        request_id="no-limit", prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True),  # no max_tokens
    )
    responses = [r async for r in stub.Generate(request)]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == MAX_MODEL_LEN - len(prompt)


async def test_cancelling_the_call_frees_the_kv_blocks(stub: worker_pb2_grpc.WorkerServiceStub,
                                                       tokenizer: Any, worker: DecodeWorker) -> None:
    prompt = tokenizer("Tell me a long story about a dragon.")["input_ids"]
    call = stub.Generate(generate_request(prompt, request_id="to-cancel", temperature=0.0, ignore_eos=True))
    await call.read()
    await call.read()
    assert (await stats(stub)).load.num_kv_blocks_used > 0
    call.cancel()
    deadline = time.monotonic() + 5
    while (load := (await stats(stub)).load).num_kv_blocks_used or load.num_running:
        assert time.monotonic() < deadline, load
        await asyncio.sleep(0.02)
    assert worker.metrics.requests.labels(outcome="abort")._value.get() >= 1


async def test_cancelling_before_the_first_token_frees_the_kv_blocks(stub: worker_pb2_grpc.WorkerServiceStub,
                                                                    tokenizer: Any, worker: DecodeWorker) -> None:
    # The worker sends its headers while the engine prefills: a client can leave in that window.
    prompt = tokenizer("Tell me a long story about a dragon and a knight.")["input_ids"]
    for attempt in range(3):
        call = stub.Generate(generate_request(prompt, request_id=f"early-{attempt}", temperature=0.0,
                                              ignore_eos=True))
        await call.initial_metadata()
        call.cancel()
    deadline = time.monotonic() + 5
    while (load := (await stats(stub)).load).num_kv_blocks_used or load.num_running or worker._servicer.num_in_flight:
        assert time.monotonic() < deadline, load
        await asyncio.sleep(0.02)
    responses = [r async for r in stub.Generate(generate_request(prompt, request_id="after", max_tokens=2, ignore_eos=True))]
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_too_long_prompt_is_invalid_argument_naming_the_field(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(generate_request([1] * MAX_MODEL_LEN, max_tokens=4)):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith("prompt_token_ids: ")
    assert ("tandem-error-field", "prompt_token_ids") in tuple(raised.value.trailing_metadata() or ())


@pytest.mark.parametrize(
    ("sampling", "field"),
    [({"top_p": 0.0}, "sampling.top_p"), ({"max_tokens": 0}, "sampling.max_tokens")],
)
async def test_invalid_sampling_names_the_field(stub: worker_pb2_grpc.WorkerServiceStub,
                                                sampling: dict[str, Any], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.Generate(generate_request([1, 2, 3], **sampling)):
            pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (raised.value.details() or "").startswith(f"{field}: ")


async def test_get_stats_describes_the_worker(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    response = await stats(stub)
    assert (response.model, response.max_model_len, response.block_size) == ("SmolLM2-135M-Instruct",
                                                                             MAX_MODEL_LEN, 16)
    assert response.load.num_kv_blocks_total == 32
    assert response.num_prefix_cache_queries > 0


async def test_registered_with_the_router_under_its_bound_port(router: RunningRouter, worker: DecodeWorker) -> None:
    assert worker.registration is not None
    await worker.registration.wait_registered(5)
    async with grpc.aio.insecure_channel(router.address) as channel:
        router_stub = router_pb2_grpc.RouterServiceStub(channel)
        (status,) = (await router_stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
        assert status.info.worker_id == f"decode-127.0.0.1-{worker.port}"
        assert status.info.address == f"127.0.0.1:{worker.port}"
        assert (status.info.model, status.info.max_model_len, status.healthy) == ("SmolLM2-135M-Instruct",
                                                                                  MAX_MODEL_LEN, True)
        assert status.load.num_kv_blocks_total == 32  # a load report has arrived
        route = await router_stub.Route(router_pb2.RouteRequest(request_id="r", model="SmolLM2-135M-Instruct",
                                                                token_ids=[1, 2]))
        assert route.address == worker.address


# -- GenerateStream: many requests over one stream -------------------------------------------


def start(stream_id: int, request: worker_pb2.GenerateRequest) -> worker_pb2.GenerateStreamRequest:
    return worker_pb2.GenerateStreamRequest(actions=[worker_pb2.StreamAction(stream_id=stream_id, start=request)])


def cancel(stream_id: int) -> worker_pb2.GenerateStreamRequest:
    return worker_pb2.GenerateStreamRequest(actions=[worker_pb2.StreamAction(
        stream_id=stream_id, cancel=worker_pb2.CancelGeneration())])


class Collected:
    """Outputs by stream id, as they came, and the number of outputs each message carried."""

    def __init__(self) -> None:
        self.responses: dict[int, list[worker_pb2.GenerateResponse]] = defaultdict(list)
        self.refusals: dict[int, common_pb2.ErrorDetail] = {}
        self.message_sizes: list[int] = []

    def add(self, message: worker_pb2.GenerateStreamResponse) -> None:
        self.message_sizes.append(len(message.outputs))
        for output in message.outputs:
            if output.HasField("refusal"):
                self.refusals[output.stream_id] = output.refusal
            else:
                self.responses[output.stream_id].append(output.response)

    def ended(self, stream_id: int) -> bool:
        responses = self.responses.get(stream_id)
        return stream_id in self.refusals or bool(
            responses and responses[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED)


async def read_until(call: Any, collected: Collected, *stream_ids: int) -> None:
    while not all(collected.ended(i) for i in stream_ids):
        message = await asyncio.wait_for(call.read(), 30)
        assert message is not grpc.aio.EOF
        collected.add(message)


async def wait_idle(stub: worker_pb2_grpc.WorkerServiceStub, worker: DecodeWorker) -> None:
    deadline = time.monotonic() + 5
    while (load := (await stats(stub)).load).num_kv_blocks_used or load.num_running or worker._servicer.num_in_flight:
        assert time.monotonic() < deadline, load
        await asyncio.sleep(0.02)


async def test_requests_on_one_stream_match_their_own_calls_and_share_messages(
        stub: worker_pb2_grpc.WorkerServiceStub, tokenizer: Any) -> None:
    prompts = [tokenizer(text)["input_ids"] for text in ("The capital of France is", "One, two,", "Hello")]
    alone = []
    for i, prompt in enumerate(prompts):
        responses = [r async for r in stub.Generate(generate_request(prompt, f"alone-{i}", max_tokens=6,
                                                                     temperature=0.0, ignore_eos=True))]
        alone.append([t for r in responses for t in r.delta.token_ids])
    call = stub.GenerateStream()
    await call.write(worker_pb2.GenerateStreamRequest(actions=[
        worker_pb2.StreamAction(stream_id=10 + i, start=generate_request(prompt, f"shared-{i}", max_tokens=6,
                                                                          temperature=0.0, ignore_eos=True))
        for i, prompt in enumerate(prompts)]))
    collected = Collected()
    await read_until(call, collected, 10, 11, 12)
    for i in range(3):
        responses = collected.responses[10 + i]
        assert [t for r in responses for t in r.delta.token_ids] == alone[i]  # greedy: the same tokens
        assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert responses[-1].usage.completion_tokens == 6
    # The three shared each forward pass, and each step's outputs left in one message.
    assert max(collected.message_sizes) == 3 and len(collected.message_sizes) < 3 * 6
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF  # every request ended and the caller closed: the call ends
    assert await call.code() == grpc.StatusCode.OK


async def test_a_refusal_names_the_field_and_the_stream_goes_on(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
    call = stub.GenerateStream()
    await call.write(start(1, generate_request([1] * MAX_MODEL_LEN, "too-long", max_tokens=4)))
    await call.write(start(2, generate_request([1, 2, 3], "bad-top-p", top_p=0.0)))
    await call.write(start(3, generate_request([1, 2, 3], "fine", max_tokens=3, ignore_eos=True)))
    collected = Collected()
    await read_until(call, collected, 1, 2, 3)
    assert collected.refusals[1].code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert collected.refusals[1].field == "prompt_token_ids"
    assert collected.refusals[1].message.startswith("prompt_token_ids: ")
    assert (collected.refusals[2].field, collected.refusals[2].code) == ("sampling.top_p",
                                                                         common_pb2.ERROR_CODE_INVALID_ARGUMENT)
    assert collected.responses[3][-1].usage.completion_tokens == 3
    call.cancel()


async def test_a_cancel_frees_its_blocks_and_the_others_go_on(stub: worker_pb2_grpc.WorkerServiceStub,
                                                            tokenizer: Any, worker: DecodeWorker) -> None:
    aborted = worker.metrics.requests.labels(outcome="abort")._value.get()
    prompt = tokenizer("Tell me a long story about a dragon.")["input_ids"]
    call = stub.GenerateStream()
    await call.write(start(1, generate_request(prompt, "long", temperature=0.0, ignore_eos=True)))
    await call.write(start(2, generate_request(prompt, "short", max_tokens=12, temperature=0.0, ignore_eos=True)))
    collected = Collected()
    while len(collected.responses[1]) < 2:
        collected.add(await call.read())
    await call.write(cancel(1))
    await read_until(call, collected, 2)
    assert collected.responses[2][-1].usage.completion_tokens == 12
    assert not collected.ended(1)  # nothing more is sent for a cancelled request
    await wait_idle(stub, worker)
    assert worker.metrics.requests.labels(outcome="abort")._value.get() == aborted + 1
    call.cancel()


async def test_ending_the_stream_aborts_its_requests(stub: worker_pb2_grpc.WorkerServiceStub, tokenizer: Any,
                                                     worker: DecodeWorker) -> None:
    prompt = tokenizer("Tell me a long story about a knight.")["input_ids"]
    call = stub.GenerateStream()
    for i in range(3):
        await call.write(start(i, generate_request(prompt, f"left-{i}", temperature=0.0, ignore_eos=True)))
    collected = Collected()
    while sum(len(r) for r in collected.responses.values()) < 6:
        collected.add(await call.read())
    assert (await stats(stub)).load.num_kv_blocks_used > 0
    call.cancel()  # the frontend went away, or its connection broke
    await wait_idle(stub, worker)


async def test_a_stream_id_in_use_is_refused(stub: worker_pb2_grpc.WorkerServiceStub, tokenizer: Any) -> None:
    prompt = tokenizer("Hello")["input_ids"]
    call = stub.GenerateStream()
    await call.write(start(7, generate_request(prompt, "first", max_tokens=16, ignore_eos=True)))
    await call.write(start(7, generate_request(prompt, "again", max_tokens=16, ignore_eos=True)))
    message = await call.read()
    refusals = [o.refusal for o in message.outputs if o.HasField("refusal")]
    while not refusals:
        message = await call.read()
        refusals = [o.refusal for o in message.outputs if o.HasField("refusal")]
    assert refusals[0].field == "stream_id" and "already running" in refusals[0].message
    call.cancel()
