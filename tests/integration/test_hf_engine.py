"""The hf engine in-process with the real model: exactness, batching, prefix reuse, limits, no leaks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from tandem.engine.config import EngineConfig
from tandem.engine.hf.engine import HFEngine
from tandem.engine.types import EngineRequest, FinishReason, RequestOutput, SamplingParams, StepInfo
from tandem.errors import InvalidRequest, ResourceExhausted
from tests.settings import TEST_DEVICE, TEST_MODEL
from tests.unit.test_model_weights import HAS_THP, mapping_of

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

# Asserts what SmolLM2 itself answers (a stop string it writes, an answer it ends early).
needs_default_model = pytest.mark.skipif(bool(TEST_MODEL), reason="needs the default model's own answers")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Water boils at", "The three primary colors are"]


@pytest.fixture(scope="module")
def steps() -> list[StepInfo]:
    return []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(model_path: Path, steps: list[StepInfo]) -> AsyncIterator[HFEngine]:
    eng = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=256, max_queue_len=4,
                                max_num_seqs=8), on_step=steps.append)
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture(scope="module")
def reference(model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(TEST_DEVICE)


async def collect(engine: HFEngine, rid: str, ids: list[int], **sampling: object) -> tuple[list[RequestOutput], float]:
    started = time.perf_counter()
    first = 0.0
    outs = []
    async for out in engine.generate(EngineRequest(rid, ids, SamplingParams(**sampling))):  # type: ignore[arg-type]
        if not outs:
            first = time.perf_counter() - started
        outs.append(out)
    return outs, first


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def assert_idle(engine: HFEngine) -> None:
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used) == (0, 0, 0)


async def test_concurrent_greedy_matches_transformers_generate(engine, reference, steps) -> None:  # type: ignore[no-untyped-def]
    tok = engine.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    steps.clear()
    results = await asyncio.gather(*(collect(engine, f"g{i}", p, max_tokens=20, temperature=0)
                                     for i, p in enumerate(ids)))
    for prompt, (outs, _) in zip(ids, results, strict=True):
        expected = reference.generate(torch.tensor([prompt], device=TEST_DEVICE), max_new_tokens=20, do_sample=False)[0]
        assert tokens_of(outs) == expected[len(prompt):].tolist()
        assert "".join(o.text for o in outs) == tok.decode(tokens_of(outs), skip_special_tokens=True)
        assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].num_output_tokens == 20
    assert max(s.num_seqs for s in steps) >= 4  # the requests shared forward passes
    assert_idle(engine)


async def test_long_prompt_greedy_matches_and_prefix_is_reused(engine, reference) -> None:  # type: ignore[no-untyped-def]
    tok = engine.tokenizer
    system = tok(" ".join(f"Rule {i}: be kind to number {i * 7}." for i in range(120)))["input_ids"]
    assert len(system) > 1000
    first_prompt = system + tok(" Question one?")["input_ids"]
    outs1, ttft1 = await collect(engine, "long1", first_prompt, max_tokens=4, temperature=0)
    expected = reference.generate(torch.tensor([first_prompt], device=TEST_DEVICE), max_new_tokens=4, do_sample=False)[0]
    assert tokens_of(outs1) == expected[len(first_prompt):].tolist()
    outs2, ttft2 = await collect(engine, "long2", system + tok(" Another question?")["input_ids"],
                                 max_tokens=4, temperature=0)
    assert outs2[-1].num_cached_tokens >= len(system) - engine.config.block_size
    if TEST_DEVICE == "cpu":  # a GPU prefills 1,000 tokens in about the time of a few: there the hit shows above
        assert ttft2 * 3 < ttft1, (ttft1, ttft2)
    stats = engine.stats()
    assert stats.num_prefix_cache_hits >= outs2[-1].num_cached_tokens
    assert_idle(engine)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the weights move into huge pages on the CPU only")
async def test_cpu_weights_live_in_anonymous_huge_page_memory(engine) -> None:  # type: ignore[no-untyped-def]
    """Not in the safetensors file's 4 KiB page-cache pages (batched decode steps were 6% slower there)."""
    tensors = [*engine.runner.model.parameters(), *engine.runner.model.buffers()]
    mappings = {mapping_of(t.data_ptr())[0] for t in tensors}
    assert mappings == {""}, f"weights still in {mappings}"
    if HAS_THP:
        assert all("hg" in mapping_of(t.data_ptr())[1] for t in tensors)


async def test_seeded_sampling_repeats_and_differs_by_seed(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer("Once upon a time, in a land far away,")["input_ids"]
    params = {"max_tokens": 16, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "ignore_eos": True}
    a, _ = await collect(engine, "s1", ids, seed=7, **params)
    b, _ = await collect(engine, "s2", ids, seed=7, **params)
    c, _ = await collect(engine, "s3", ids, seed=8, **params)
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)


@needs_default_model
async def test_stop_string_and_stop_token(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer("1, 2, 3, 4,")["input_ids"]
    outs, _ = await collect(engine, "stop", ids, max_tokens=30, temperature=0, stop=[" 7"])
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason is FinishReason.STOP
    assert " 7" not in text and text.startswith(" 5, 6,")
    comma = engine.tokenizer(",", add_special_tokens=False)["input_ids"][0]
    outs, _ = await collect(engine, "stop-id", ids, max_tokens=30, temperature=0, stop_token_ids=[comma])
    assert outs[-1].finish_reason is FinishReason.STOP and tokens_of(outs)[-1] == comma
    await asyncio.sleep(0.2)  # the engine side of a stop-string abort is asynchronous
    assert_idle(engine)


async def test_closing_the_stream_aborts_and_frees_blocks(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer("Tell me a very long story about dragons.")["input_ids"]
    stream = engine.generate(EngineRequest("gone", ids, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)))
    await stream.__anext__()
    assert engine.stats().num_kv_blocks_used > 0
    await stream.aclose()
    for _ in range(50):
        if engine.stats().num_kv_blocks_used == 0:
            break
        await asyncio.sleep(0.05)
    assert_idle(engine)


async def test_bad_requests_fail_before_the_first_token(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest) as info:
        await collect(engine, "too-long", [1] * engine.max_model_len)
    assert str(engine.max_model_len) in info.value.message and info.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="vocabulary"):
        await collect(engine, "bad-token", [10**7])
    with pytest.raises(InvalidRequest, match="empty"):
        await collect(engine, "empty", [])
    assert_idle(engine)


async def test_full_queue_is_refused_and_the_rest_complete(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer("Count:")["input_ids"]
    capacity = engine.config.max_num_seqs + engine.config.max_queue_len
    streams = [engine.generate(EngineRequest(f"q{i}", ids, SamplingParams(max_tokens=3, temperature=0)))
               for i in range(capacity)]
    firsts = await asyncio.gather(*(s.__anext__() for s in streams))
    with pytest.raises(ResourceExhausted):
        await collect(engine, "one-too-many", ids, max_tokens=3)
    for first, stream in zip(firsts, streams, strict=True):
        outs = [first] + [o async for o in stream]
        assert outs[-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)


async def test_small_pool_makes_requests_wait_not_fail(model_path: Path) -> None:
    eng = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=12, max_num_seqs=8))
    await eng.start()
    try:
        ids = eng.tokenizer("A list of fruits: apple, banana, cherry, date, elderberry, fig,")["input_ids"]
        results = await asyncio.gather(*(collect(eng, f"p{i}", ids, max_tokens=24, temperature=0, ignore_eos=True)
                                         for i in range(6)))
        texts = {"".join(o.text for o in outs) for outs, _ in results}
        assert len(texts) == 1  # the same greedy output whatever waited or was preempted
        assert all(outs[-1].num_output_tokens == 24 for outs, _ in results)
        assert_idle(eng)
    finally:
        await eng.shutdown()


@contextlib.asynccontextmanager
async def gathering_engine(model_path: Path, batch_wait_ms: float,
                           steps: list[StepInfo]) -> AsyncIterator[tuple[HFEngine, list[int]]]:
    """A small engine that has run one request (so it knows a step time), and a short prompt's ids;
    its steps go to ``steps``. On leaving, every block must be free again."""
    eng = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=64, max_num_seqs=8,
                                batch_wait_ms=batch_wait_ms), on_step=steps.append)
    await eng.start()
    try:
        ids = eng.tokenizer("Write a short story about the sea.")["input_ids"]
        await collect(eng, "warm", ids, max_tokens=2)
        yield eng, ids
        assert_idle(eng)
    finally:
        await eng.shutdown()


async def staggered_burst(eng: HFEngine, ids: list[int], name: str, delays_s: list[float]) -> None:
    """One two-token request per delay, each sent that long after the burst starts."""
    async def one(i: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await collect(eng, f"{name}-{i}", ids, max_tokens=2, temperature=0, ignore_eos=True)

    await asyncio.gather(*(one(i, d) for i, d in enumerate(delays_s)))


@pytest.mark.parametrize("batch_wait_ms", [8.0, 0.0])
async def test_requests_arriving_a_millisecond_apart_share_an_idle_engines_first_step(
        model_path: Path, batch_wait_ms: float) -> None:
    # As requests a client sends together reach a worker through the frontend: one at a time.
    steps: list[StepInfo] = []
    async with gathering_engine(model_path, batch_wait_ms, steps) as (eng, ids):
        steps.clear()
        await staggered_burst(eng, ids, "burst", [0.001 * i for i in range(4)])
        if batch_wait_ms:
            assert steps[0].num_seqs == 4 and steps[0].num_prefill_tokens == 4 * len(ids)
            assert len(steps) == 2  # one prefill step for all four, one decode step
            # The wait spanned the burst (3 ms from first to last) and a quiet gap after it.
            assert steps[0].batch_wait_s is not None and 0.003 <= steps[0].batch_wait_s <= batch_wait_ms / 1e3 + 0.005
        else:
            assert steps[0].num_seqs < 4  # the first arrival prefilled alone (or nearly)
            assert len(steps) > 2
            assert steps[0].batch_wait_s is not None and steps[0].batch_wait_s < 0.001
        assert all(step.batch_wait_s is None for step in steps[1:])  # they followed a step, not a wait


async def test_a_burst_longer_than_the_quiet_gap_still_shares_the_first_step(model_path: Path) -> None:
    # With fast steps (a GPU's 20-40 ms) the quiet gap is short, but a burst whose requests come
    # closer together than the gap keeps the wait going, up to batch_wait_ms.
    steps: list[StepInfo] = []
    async with gathering_engine(model_path, 20.0, steps) as (eng, ids):
        eng._recent_step_s = 0.04  # a quiet gap of 3 ms; five arrivals 1 ms apart span 4-5 ms
        steps.clear()
        await staggered_burst(eng, ids, "burst", [0.001 * i for i in range(5)])
        assert steps[0].num_seqs == 5 and steps[0].num_prefill_tokens == 5 * len(ids)
        assert len(steps) == 2


async def test_a_burst_whose_straggler_missed_the_step_is_caught_whole_the_next_time(model_path: Path) -> None:
    # On a busy host the frontend's arrivals can come further apart than the 3 ms quiet gap; a straggler
    # then waits a whole step. The engine learns the gap such bursts need (within 7.5% of a step).
    steps: list[StepInfo] = []
    async with gathering_engine(model_path, 50.0, steps) as (eng, ids):
        async def first_step_of_burst(name: str) -> int:
            """Three requests at once and a fourth 10 ms later: how many the first step prefilled."""
            eng._recent_step_s = 0.4  # a gap of up to 30 ms is allowed (7.5%), whatever this host's step
            steps.clear()
            await staggered_burst(eng, ids, name, [0.0, 0.0, 0.0, 0.010])
            return steps[0].num_seqs

        assert await first_step_of_burst("first") == 3  # the 3 ms gap ended before the straggler came
        assert await first_step_of_burst("second") == 4  # the gap grew to cover it (15 ms)


async def test_prefill_export_import_continues_token_identically(engine, model_path: Path) -> None:  # type: ignore[no-untyped-def]
    decode = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=128))
    await decode.start()
    try:
        ids = engine.tokenizer("Notes: " + " ".join(f"note {i} is short." for i in range(60)) + " In sum,")["input_ids"]
        sampling = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        expected = tokens_of((await collect(decode, "agg", ids, max_tokens=12, temperature=0, ignore_eos=True))[0])
        await decode.shutdown()
        decode = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=128))
        await decode.start()  # a fresh pool: every block must come over

        prefilled = await engine.prefill(EngineRequest("pre", ids, sampling))
        assert engine.stats().num_kv_blocks_used == len(prefilled.block_ids) > 0
        reservation = await decode.reserve_kv(EngineRequest("dec", ids, sampling))
        assert reservation is not None and reservation.num_cached_tokens == 0

        async def load(r):  # type: ignore[no-untyped-def]
            layers = engine.kv_layout().num_layers
            decode.write_kv(r, 0, 0, engine.read_kv(prefilled.block_ids, 0, layers))

        outs = [o async for o in decode.generate_imported(EngineRequest("dec", ids, sampling), reservation,
                                                          prefilled.first_token_id, load)]
        assert tokens_of(outs) == expected
        await engine.release_kv("pre")

        async def broken(r):  # type: ignore[no-untyped-def]
            raise ConnectionError("prefill worker gone")

        again = await decode.reserve_kv(EngineRequest("dec2", ids, sampling))
        outs = [o async for o in decode.generate_imported(EngineRequest("dec2", ids, sampling), again,
                                                          prefilled.first_token_id, broken)]
        assert tokens_of(outs) == expected  # fell back to a local prefill, same output
        await asyncio.sleep(0.1)
        assert_idle(engine)
        assert_idle(decode)
    finally:
        await decode.shutdown()


def _chat_ids(engine: HFEngine, text: str) -> list[int]:
    ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _greedy_with_openai_penalties(model, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:  # type: ignore[no-untyped-def]
    """A plain reference: the whole sequence through the model each step, OpenAI's formula on the output."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids], device=TEST_DEVICE)).logits[0, -1].clone()
            for token in set(out):
                logits[token] -= presence + frequency * out.count(token)
            token = int(torch.argmax(logits))
            ids.append(token)
            out.append(token)
    return out


@needs_default_model
async def test_penalties_and_min_tokens_match_reference_decoders_in_one_batch(engine, reference, steps) -> None:  # type: ignore[no-untyped-def]
    story = _chat_ids(engine, "Say hi.")
    counting = engine.tokenizer(PROMPTS[3])["input_ids"]  # "1, 2, 3, 4,": the output repeats ", " at once
    short = _chat_ids(engine, "Is the sky blue? Answer yes or no.")
    plain_ids = engine.tokenizer(PROMPTS[0])["input_ids"]
    steps.clear()
    (repeated, _), (openai, _), (at_least, _), (plain, _), (unforced, _) = await asyncio.gather(
        collect(engine, "rep", story, max_tokens=16, temperature=0, repetition_penalty=1.3),
        collect(engine, "oai", counting, max_tokens=16, temperature=0, presence_penalty=0.8, frequency_penalty=0.6),
        collect(engine, "min", short, max_tokens=12, temperature=0, min_tokens=8),
        collect(engine, "plain", plain_ids, max_tokens=12, temperature=0),
        collect(engine, "unforced", short, max_tokens=12, temperature=0),
    )
    assert max(s.num_seqs for s in steps) >= 3  # penalised and plain requests shared forward passes
    expected = reference.generate(torch.tensor([story], device=TEST_DEVICE), max_new_tokens=16, do_sample=False, repetition_penalty=1.3)
    assert tokens_of(repeated) == expected[0][len(story):].tolist()
    assert tokens_of(openai) == _greedy_with_openai_penalties(reference, counting, 16, 0.8, 0.6)
    # The penalties changed the text.
    assert tokens_of(repeated) != reference.generate(torch.tensor([story], device=TEST_DEVICE), max_new_tokens=16,
                                                     do_sample=False)[0][len(story):].tolist()
    assert tokens_of(openai) != reference.generate(torch.tensor([counting], device=TEST_DEVICE), max_new_tokens=16,
                                                   do_sample=False)[0][len(counting):].tolist()
    # Without min_tokens the answer ends after 3 tokens; with it, EOS waits for 8, as transformers' min_new_tokens.
    assert unforced[-1].finish_reason is FinishReason.STOP and len(tokens_of(unforced)) < 8
    forced = reference.generate(torch.tensor([short], device=TEST_DEVICE), max_new_tokens=12, do_sample=False, min_new_tokens=8)
    assert tokens_of(at_least) == forced[0][len(short):].tolist() and len(tokens_of(at_least)) >= 8
    assert tokens_of(plain) == reference.generate(torch.tensor([plain_ids], device=TEST_DEVICE), max_new_tokens=12,
                                                  do_sample=False)[0][len(plain_ids):].tolist()
    assert_idle(engine)


async def test_a_resumed_request_counts_its_earlier_output_for_penalties(engine, reference) -> None:  # type: ignore[no-untyped-def]
    # What a frontend sends after a migration: prompt + the 5 tokens already streamed, 11 left.
    counting = engine.tokenizer(PROMPTS[3])["input_ids"]
    whole = _greedy_with_openai_penalties(reference, counting, 16, 0.8, 0.6)
    outs = []
    async for out in engine.generate(EngineRequest("moved", counting + whole[:5], SamplingParams(
            max_tokens=11, temperature=0, presence_penalty=0.8, frequency_penalty=0.6), num_resumed_output_tokens=5)):
        outs.append(out)
    assert tokens_of(outs) == whole[5:]
    with pytest.raises(InvalidRequest, match="num_resumed_output_tokens"):
        await anext(engine.generate(EngineRequest("bad", [1, 2], SamplingParams(), num_resumed_output_tokens=2)))
    assert_idle(engine)


async def test_logprobs_match_transformers_logits_and_do_not_change_the_tokens(engine, reference) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer(PROMPTS[1])["input_ids"]
    (with_logprobs, _), (without, _) = await asyncio.gather(
        collect(engine, "lp", ids, max_tokens=8, temperature=0, logprobs=3),
        collect(engine, "nolp", ids, max_tokens=8, temperature=0))
    assert tokens_of(with_logprobs) == tokens_of(without)
    assert all(out.logprobs is None for out in without)
    entries = [lp for out in with_logprobs for lp in out.logprobs or []]
    assert [e.token_id for e in entries] == tokens_of(with_logprobs)
    expected = reference.generate(torch.tensor([ids], device=TEST_DEVICE), max_new_tokens=8, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    for entry, logits in zip(entries, expected.logits, strict=True):
        reference_logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        assert entry.logprob == pytest.approx(float(reference_logprobs[entry.token_id]), abs=1e-4)
        top = torch.topk(reference_logprobs, 3)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert entry.top[0][0] == entry.token_id  # greedy draws the most likely token
    assert_idle(engine)


def _reference_prompt_scores(reference, ids: list[int], num_top: int) -> list[tuple[float, list[int]]]:  # type: ignore[no-untyped-def]
    """transformers' log-probability of each prompt token after the first, and the top alternatives."""
    with torch.inference_mode():
        logits = reference(torch.tensor([ids], device=TEST_DEVICE)).logits[0].float()
    scores = torch.log_softmax(logits, dim=-1)
    return [(float(scores[p, ids[p + 1]]), torch.topk(scores[p], num_top).indices.tolist())
            for p in range(len(ids) - 1)]


async def test_prompt_logprobs_score_every_prompt_token_even_when_its_prefix_is_cached(engine, reference) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenizer(" ".join(PROMPTS) + " and so the story goes on")["input_ids"]
    assert len(ids) > 2 * engine.config.block_size
    plain, _ = await collect(engine, "cache-it", ids, max_tokens=4, temperature=0)  # the prefix is now cached
    assert all(out.prompt_logprobs is None for out in plain)
    scored, _ = await collect(engine, "score-it", ids, max_tokens=4, temperature=0, prompt_logprobs=2)
    assert tokens_of(scored) == tokens_of(plain)  # scoring the prompt changes no output token
    assert scored[0].num_cached_tokens == 0  # computed again: a cached block holds no logits
    entries = scored[0].prompt_logprobs
    assert entries is not None and all(out.prompt_logprobs is None for out in scored[1:])
    expected = _reference_prompt_scores(reference, ids, 2)
    assert [e.token_id for e in entries] == ids[1:]
    for entry, (logprob, top) in zip(entries, expected, strict=True):
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        assert [t for t, _ in entry.top] == top
    assert_idle(engine)


async def test_prompt_logprobs_of_a_prompt_prefilled_in_chunks_beside_other_requests(model_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    # 16 tokens a step: the scored prompt takes several steps, sharing them with a plain request.
    eng = HFEngine(EngineConfig(model_path=model_path, device=TEST_DEVICE, num_threads=1, num_kv_blocks=64, max_num_batched_tokens=16))
    await eng.start()
    try:
        ids = eng.tokenizer(" ".join(PROMPTS))["input_ids"]
        other = eng.tokenizer(PROMPTS[4])["input_ids"]
        assert len(ids) > 2 * 16
        (scored, _), (plain, _) = await asyncio.gather(
            collect(eng, "chunked", ids, max_tokens=3, temperature=0, prompt_logprobs=0),
            collect(eng, "beside", other, max_tokens=3, temperature=0))
        entries = scored[0].prompt_logprobs
        assert entries is not None
        expected = _reference_prompt_scores(reference, ids, 1)
        assert [e.token_id for e in entries] == ids[1:]
        assert all(e.top == () for e in entries)  # 0 alternatives asked for
        assert [e.logprob for e in entries] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
        assert plain[0].prompt_logprobs is None
        with pytest.raises(InvalidRequest, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=21)
        stats = eng.stats()
        assert (stats.num_running, stats.num_waiting, stats.num_kv_blocks_used) == (0, 0, 0)
    finally:
        await eng.shutdown()
