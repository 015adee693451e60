"""Disaggregated prefill with the real model, in-process: a prefill worker, decode workers pulling over
shared memory and gRPC, and an aggregated decode worker as the reference. Faults included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.decode.server import serve as serve_decode
from services.prefill.config import PrefillConfig
from services.prefill.server import PrefillWorker
from services.prefill.server import serve as serve_prefill
from tandem.kv.transfer.protocol import TransferHandle
from tandem.proto.common.v1 import common_pb2
from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

MAX_TOKENS = 6


def prefill_config(model_path: Path, **overrides: Any) -> PrefillConfig:
    return PrefillConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "model": str(model_path),
                            "num_threads": 1, "num_kv_blocks": 320, "drain_timeout_s": 0.0, **overrides})


def decode_config(model_path: Path, **overrides: Any) -> DecodeConfig:
    return DecodeConfig(**{"host": "127.0.0.1", "port": 0, "metrics_port": 0, "model": str(model_path),
                           "num_threads": 1, "num_kv_blocks": 320, "kv_max_retries": 2, **overrides})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def prefill(model_path: Path) -> AsyncIterator[PrefillWorker]:
    worker = await serve_prefill(prefill_config(model_path, kv_lease_s=30.0))
    yield worker
    await worker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def aggregated(model_path: Path) -> AsyncIterator[DecodeWorker]:
    worker = await serve_decode(decode_config(model_path))
    yield worker
    await worker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def over_shm(model_path: Path) -> AsyncIterator[DecodeWorker]:
    worker = await serve_decode(decode_config(model_path, kv_transport="auto"))  # same host: shared memory
    yield worker
    await worker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def over_grpc(model_path: Path) -> AsyncIterator[DecodeWorker]:
    worker = await serve_decode(decode_config(model_path, kv_transport="grpc", kv_streams=2))
    yield worker
    await worker.stop(0)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_back_to_zero(prefill: PrefillWorker, aggregated: DecodeWorker, over_shm: DecodeWorker,
                             over_grpc: DecodeWorker) -> AsyncIterator[None]:
    for worker in (over_shm, over_grpc):
        assert worker.remote_prefill is not None
        worker.remote_prefill.before_pull = None
        worker.remote_prefill.grpc_puller.chunk_hook = None
        worker.remote_prefill.shm_puller.chunk_hook = None
    yield
    engines = [prefill.engine, aggregated.engine, over_shm.engine, over_grpc.engine]
    for _ in range(100):
        if not any(engine.stats().num_kv_blocks_used for engine in engines) and not len(prefill.servicer.leases):
            break
        await asyncio.sleep(0.05)
    assert [engine.stats().num_kv_blocks_used for engine in engines] == [0, 0, 0, 0]
    assert len(prefill.servicer.leases) == 0


def hint(prefill: PrefillWorker | str, min_tokens: int = 0) -> worker_pb2.PrefillHint:
    address = prefill if isinstance(prefill, str) else prefill.address
    return worker_pb2.PrefillHint(worker_id="p", address=address, min_remote_prefill_tokens=min_tokens)


def request(ids: list[int], request_id: str, prefill_hint: worker_pb2.PrefillHint | None = None,
            max_tokens: int = MAX_TOKENS) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=ids, prefill=prefill_hint,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def generate(worker: DecodeWorker, message: worker_pb2.GenerateRequest) -> tuple[list[int], int]:
    """Token ids and cached prompt tokens of one Generate call."""
    async with grpc.aio.insecure_channel(worker.address) as channel:
        tokens: list[int] = []
        cached = 0
        async for response in worker_pb2_grpc.WorkerServiceStub(channel).Generate(message):
            assert response.finish_reason != common_pb2.FINISH_REASON_ERROR, response.error.message
            tokens += response.delta.token_ids
            if response.HasField("usage"):
                cached = response.usage.cached_prompt_tokens
        return tokens, cached


def sample(worker: DecodeWorker | PrefillWorker, name: str, labels: dict[str, str] | None = None) -> float:
    return worker.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def prompts(tokenizer: Any) -> list[list[int]]:
    """20 prompts: two over 1,000 tokens, six sharing a 500-token prefix, the rest 5 to 400 tokens."""
    def ids(text: str) -> list[int]:
        return list(tokenizer(text)["input_ids"])

    story = " ".join(f"On day {i} the keeper of lighthouse {i % 7} wrote that the sea was {['calm', 'grey', 'wild'][i % 3]}."
                     for i in range(120))
    long_prompts = [ids(story[:n] + " Summarise the log:") for n in (3900, 4400)]
    prefix = ids("You are a careful assistant. Rules: " + " ".join(f"rule {i}: be precise about item {i}." for i in range(40)))
    shared = [prefix + ids(f" Question {q}: what does rule {q} say?") for q in range(6)]
    short = [ids(text) for text in (
        "The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
        "Water boils at", "The three primary colors are", "import numpy as np\n",
        "Translate to French: good morning", "A haiku about autumn:",
        "List of prime numbers: " + ", ".join(str(p) for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)),
        "Notes: " + " ".join(f"note {i} is short." for i in range(60)) + " In sum,",
        "Recipe: " + " ".join(f"step {i}, stir for {i} minutes." for i in range(50)),
    )]
    return long_prompts + shared + short


async def test_disaggregated_greedy_output_is_token_identical_to_aggregated(
        prefill: PrefillWorker, aggregated: DecodeWorker, over_shm: DecodeWorker, over_grpc: DecodeWorker,
        tokenizer: Any) -> None:
    cases = prompts(tokenizer)
    assert len(cases) >= 20 and sum(len(ids) > 1000 for ids in cases) == 2
    expected = [(await generate(aggregated, request(ids, f"agg-{i}")))[0] for i, ids in enumerate(cases)]
    # Shared memory: every prompt, three at a time (concurrent transfers); gRPC: a long one and the shared prefix.
    over_shm_outputs: list[list[int]] = [[] for _ in cases]
    for start in range(0, len(cases), 3):
        batch = range(start, min(start + 3, len(cases)))
        results = await asyncio.gather(*(generate(over_shm, request(cases[i], f"shm-{i}", hint(prefill))) for i in batch))
        for i, (tokens, _) in zip(batch, results, strict=True):
            over_shm_outputs[i] = tokens
    assert over_shm_outputs == expected
    grpc_cases = [0, 2, 3, 4]
    cached_tokens = []
    for i in grpc_cases:
        tokens, cached = await generate(over_grpc, request(cases[i], f"grpc-{i}", hint(prefill)))
        assert tokens == expected[i], f"prompt {i} ({len(cases[i])} tokens)"
        cached_tokens.append(cached)
    assert cached_tokens[0] == 0 and min(cached_tokens[2:]) > 100  # the shared prefix was pulled once
    for worker, transport, num_remote in ((over_shm, "shm", len(cases)), (over_grpc, "grpc", len(grpc_cases))):
        assert sample(worker, "tandem_worker_prefills_total", {"where": "remote", "reason": ""}) == num_remote
        assert sample(worker, "tandem_kv_transfer_received_bytes_total", {"transport": transport}) > 0
        assert sample(worker, "tandem_kv_transfer_failures_total", {"reason": "corrupt"}) == 0
    assert sample(prefill, "tandem_kv_leases_ended_total", {"reason": "released"}) >= len(cases) + len(grpc_cases)


async def test_the_first_token_does_not_wait_for_the_transfer(prefill: PrefillWorker, over_grpc: DecodeWorker,
                                                              tokenizer: Any) -> None:
    assert over_grpc.remote_prefill is not None

    async def slow_start(handle: TransferHandle) -> None:
        await asyncio.sleep(1.0)

    over_grpc.remote_prefill.before_pull = slow_start
    ids = list(tokenizer("Tell me about the moon. " * 20)["input_ids"])
    arrivals: list[float] = []
    async with grpc.aio.insecure_channel(over_grpc.address) as channel:
        started = time.perf_counter()
        async for response in worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(ids, "first", hint(prefill))):
            if response.delta.token_ids:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 2 and arrivals[1] - arrivals[0] > 0.9  # token 1 came before the 1 s stall


async def test_an_unreachable_prefill_worker_means_a_local_prefill(aggregated: DecodeWorker, over_grpc: DecodeWorker,
                                                                   tokenizer: Any, unused_tcp_port: int) -> None:
    ids = list(tokenizer("The history of the bicycle, in brief: " * 10)["input_ids"])
    expected, _ = await generate(aggregated, request(ids, "ref-unreachable"))
    before = sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "prefill_failed"})
    tokens, _ = await generate(over_grpc, request(ids, "unreachable", hint(f"127.0.0.1:{unused_tcp_port}")))
    assert tokens == expected
    assert sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "prefill_failed"}) == before + 1


async def test_a_mostly_cached_prompt_is_prefilled_locally(prefill: PrefillWorker, over_grpc: DecodeWorker,
                                                           tokenizer: Any) -> None:
    ids = list(tokenizer("A long shared preamble about gardening. " * 30)["input_ids"])
    await generate(over_grpc, request(ids, "warm"))  # now cached on this decode worker
    before = sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "short_prompt"})
    _, cached = await generate(over_grpc, request(ids + [42], "cached", hint(prefill, min_tokens=64)))
    assert cached > len(ids) - 16
    assert sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "short_prompt"}) == before + 1


class OneChunkThenStall:
    """Wraps a prefill worker's exporter: sends the first chunk of a pull, then holds the rest back."""

    name = "grpc"

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def chunks(self, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
        async for message in self._inner.chunks(*args, **kwargs):
            yield message
            await asyncio.sleep(3600)  # until the worker is stopped (which cancels this call)

    def release(self, transfer_id: str) -> None:
        self._inner.release(transfer_id)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.parametrize("when", ["before", "during"])
async def test_a_prefill_worker_killed_around_the_transfer_leaves_the_output_unchanged(
        model_path: Path, aggregated: DecodeWorker, over_grpc: DecodeWorker, tokenizer: Any, when: str) -> None:
    victim = await serve_prefill(prefill_config(model_path, num_kv_blocks=128))
    remote = over_grpc.remote_prefill
    assert remote is not None
    ids = list(tokenizer(f"A report on rivers ({when}): " + "the river bends and widens. " * 40)["input_ids"])
    expected, _ = await generate(aggregated, request(ids, f"ref-{when}"))
    killed = asyncio.Event()

    async def kill() -> None:
        if not killed.is_set():
            killed.set()
            await victim.stop(0)

    async def kill_before(handle: TransferHandle) -> None:
        await kill()

    async def kill_during(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        await kill()  # after the first chunk arrived; the server holds the rest back (below)
        return payload

    if when == "before":
        remote.before_pull = kill_before
    else:
        remote.grpc_puller.chunk_hook = kill_during
        victim.servicer.exporters[kv_pb2.KV_TRANSPORT_GRPC] = OneChunkThenStall(
            victim.servicer.exporters[kv_pb2.KV_TRANSPORT_GRPC])
    failures = sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"})
    try:
        tokens, _ = await generate(over_grpc, request(ids, f"killed-{when}", hint(victim)))
    finally:
        await victim.stop(0)
    assert killed.is_set() and tokens == expected
    assert sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"}) == failures + 1
    assert victim.engine.stats().num_kv_blocks_used == 0


async def test_a_corrupted_chunk_is_fetched_again_and_the_output_is_unchanged(
        prefill: PrefillWorker, aggregated: DecodeWorker, over_grpc: DecodeWorker, tokenizer: Any) -> None:
    remote = over_grpc.remote_prefill
    assert remote is not None
    damaged: list[int] = []

    async def corrupt_once(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        if not damaged:
            damaged.append(header.sequence_number)
            flipped = bytearray(payload)
            flipped[7] ^= 0x01
            return memoryview(bytes(flipped))
        return payload

    remote.grpc_puller.chunk_hook = corrupt_once
    ids = list(tokenizer("Checksums matter because " * 25)["input_ids"])
    expected, _ = await generate(aggregated, request(ids, "ref-corrupt"))
    retries = sample(over_grpc, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"})
    failures = sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"})
    tokens, _ = await generate(over_grpc, request(ids, "corrupt", hint(prefill)))
    assert damaged and tokens == expected
    assert sample(over_grpc, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"}) == retries + 1
    assert sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"}) == failures


async def test_blocks_nobody_pulls_are_freed_when_the_lease_expires(prefill: PrefillWorker, tokenizer: Any) -> None:
    prefill.servicer.leases.lease_s = 0.5
    try:
        async with grpc.aio.insecure_channel(prefill.address) as channel:
            response = await kv_pb2_grpc.PrefillServiceStub(channel).Prefill(kv_pb2.PrefillRequest(
                request_id="orphan", prompt_token_ids=list(tokenizer("Nobody will pull this. " * 20)["input_ids"]),
                sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0)))
        assert response.handle.lease_ms == 500 and prefill.engine.stats().num_kv_blocks_used > 0
        expired = sample(prefill, "tandem_kv_leases_ended_total", {"reason": "expired"})
        for _ in range(60):  # the expiry check runs every second
            if prefill.engine.stats().num_kv_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        assert prefill.engine.stats().num_kv_blocks_used == 0
        assert sample(prefill, "tandem_kv_leases_ended_total", {"reason": "expired"}) == expired + 1
    finally:
        prefill.servicer.leases.lease_s = 30.0


@pytest.mark.parametrize("transport", ["grpc", "shm"])
async def test_a_client_leaving_mid_transfer_frees_blocks_on_both_sides(
        prefill: PrefillWorker, over_shm: DecodeWorker, over_grpc: DecodeWorker, transport: str,
        tokenizer: Any) -> None:
    decode = over_grpc if transport == "grpc" else over_shm
    remote = decode.remote_prefill
    assert remote is not None
    in_transfer = asyncio.Event()

    async def stall(header: kv_pb2.KvChunk, payload: memoryview) -> memoryview:
        in_transfer.set()
        await asyncio.sleep(30)
        return payload

    async def stall_before_copy(handle: TransferHandle) -> None:
        # Same host, the prefill engine's pool is shared: the copy is one step with no chunks, so
        # stall just before it.
        assert handle.shared_pool is not None and len(handle.block_ids) == handle.num_blocks
        in_transfer.set()
        await asyncio.sleep(30)

    if transport == "grpc":
        remote.grpc_puller.chunk_hook = stall
    else:
        remote.before_pull = stall_before_copy
    ids = list(tokenizer("A long letter that the reader abandons. " * 30)["input_ids"])
    released = sample(prefill, "tandem_kv_leases_ended_total", {"reason": "released"})
    async with grpc.aio.insecure_channel(decode.address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(ids, f"leaver-{transport}", hint(prefill)))
        first = await call.read()  # the first token, then the transfer starts
        assert list(first.delta.token_ids)
        await asyncio.wait_for(in_transfer.wait(), 10)
        assert prefill.engine.stats().num_kv_blocks_used > 0 and decode.engine.stats().num_kv_blocks_used > 0
        call.cancel()
    for _ in range(100):
        if not prefill.engine.stats().num_kv_blocks_used and not decode.engine.stats().num_kv_blocks_used:
            break
        await asyncio.sleep(0.05)
    # Freed by the decode worker's ReleaseKv, long before the 30 s lease would have.
    assert sample(prefill, "tandem_kv_leases_ended_total", {"reason": "released"}) == released + 1



async def test_logprobs_and_penalties_survive_remote_prefill(prefill: PrefillWorker, aggregated: DecodeWorker,
                                                             over_shm: DecodeWorker, tokenizer: Any) -> None:
    # The first token is drawn on the prefill worker: its logprob and the request's penalties travel too.
    ids = prompts(tokenizer)[1]
    asked = request(ids, "lp-agg")
    asked.sampling.logprobs, asked.sampling.repetition_penalty = 2, 1.3

    async def responses(worker: DecodeWorker, message: worker_pb2.GenerateRequest) -> list[common_pb2.TokenLogprob]:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            entries: list[common_pb2.TokenLogprob] = []
            async for response in worker_pb2_grpc.WorkerServiceStub(channel).Generate(message):
                assert len(response.delta.logprobs) == len(response.delta.token_ids)
                entries += response.delta.logprobs
            return entries

    expected = await responses(aggregated, asked)
    remote = worker_pb2.GenerateRequest()
    remote.CopyFrom(asked)
    remote.request_id = "lp-remote"
    remote.prefill.CopyFrom(hint(prefill))
    remote_before = sample(over_shm, "tandem_worker_prefills_total", {"where": "remote", "reason": ""})
    got = await responses(over_shm, remote)
    assert sample(over_shm, "tandem_worker_prefills_total", {"where": "remote", "reason": ""}) == remote_before + 1
    assert [e.token_id for e in got] == [e.token_id for e in expected] and len(got) == MAX_TOKENS
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert [len(e.top_logprobs) for e in got] == [2] * MAX_TOKENS
    assert (await generate(aggregated, request(ids, "plain")))[0] != [e.token_id for e in expected]  # penalised


async def test_a_prompt_to_score_is_prefilled_on_the_decode_worker(prefill: PrefillWorker, aggregated: DecodeWorker,
                                                                   over_grpc: DecodeWorker, tokenizer: Any) -> None:
    # prompt_logprobs need the logits of every prompt position, which a KV transfer does not carry.
    ids = prompts(tokenizer)[0]
    asked = request(ids, "score-remote", hint(prefill))
    asked.sampling.prompt_logprobs = 1
    before = sample(over_grpc, "tandem_worker_prefills_total", {"where": "local", "reason": "prompt_logprobs"})
    async with grpc.aio.insecure_channel(over_grpc.address) as channel:
        responses = [r async for r in worker_pb2_grpc.WorkerServiceStub(channel).Generate(asked)]
    assert sample(over_grpc, "tandem_worker_prefills_total",
                  {"where": "local", "reason": "prompt_logprobs"}) == before + 1
    assert [e.token_id for e in responses[0].prompt_logprobs] == ids[1:]
    assert all(len(e.top_logprobs) == 1 for e in responses[0].prompt_logprobs)
    expected, _ = await generate(aggregated, request(ids, "score-ref"))
    assert [t for r in responses for t in r.delta.token_ids] == expected
