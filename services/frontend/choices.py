"""A request's choices: one generation per choice (``n``) and per prompt of a batch, their outputs
interleaved for a stream or collected for one answer, and their usage and bodies merged."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from services.frontend import openai_responses as responses
from services.frontend.pipeline import GenerationRequest, Pipeline
from tandem.engine.types import RequestOutput, TokenLogprob
from tandem.errors import TandemError


@dataclasses.dataclass(slots=True)
class Collected:
    """One choice of a request answered in one piece."""

    text: str
    last: RequestOutput
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob]  # echo with logprobs: prompt tokens 1, 2, ...


async def collect(pipeline: Pipeline, generation: GenerationRequest) -> Collected:
    """One choice's whole answer: its text, last output and log-probabilities."""
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    prompt_logprobs: list[TokenLogprob] = []
    last: RequestOutput | None = None
    async with aclosing(pipeline.generate(generation)) as outputs:
        async for output in outputs:
            texts.append(output.text)
            logprobs.extend(output.logprobs or ())
            prompt_logprobs.extend(output.prompt_logprobs or ())
            last = output
    if last is None or not last.finished:
        raise TandemError("the worker stream ended without a result")
    return Collected("".join(texts), last, logprobs, prompt_logprobs)


async def collect_all(pipeline: Pipeline, generations: list[GenerationRequest]) -> list[Collected]:
    if len(generations) == 1:
        return [await collect(pipeline, generations[0])]
    return list(await asyncio.gather(*(collect(pipeline, g) for g in generations)))


async def outputs_of(pipeline: Pipeline,
                     generations: list[GenerationRequest]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Every choice's outputs as (choice index, output), in the order they come."""
    if len(generations) == 1:
        async with aclosing(pipeline.generate(generations[0])) as outputs:
            async for output in outputs:
                yield 0, output
        return
    arrived: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, generation: GenerationRequest) -> None:
        try:
            async with aclosing(pipeline.generate(generation)) as choice_outputs:
                async for choice_output in choice_outputs:
                    arrived.put_nowait((index, choice_output, None))
        except Exception as exc:  # noqa: BLE001  handed to the reader, which raises it
            arrived.put_nowait((index, None, exc))

    pumps = [asyncio.create_task(pump(i, g), name=f"choice-{i}") for i, g in enumerate(generations)]
    try:
        num_open = len(generations)
        while num_open:
            index, arrival, error = await arrived.get()
            if error is not None:
                raise error
            assert arrival is not None
            yield index, arrival
            num_open -= arrival.finished
    finally:  # the client left, or a choice failed: the others stop and free their blocks
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


def usage_of(output: RequestOutput) -> responses.Usage:
    return responses.Usage(output.num_prompt_tokens, output.num_output_tokens, output.num_cached_tokens)


def total_usage(finals: list[RequestOutput], choices_per_prompt: int) -> responses.Usage:
    """Every prompt once (as OpenAI counts a prompt with n choices), every choice's completion tokens;
    ``finals`` in choice order, ``choices_per_prompt`` of them for each prompt."""
    firsts = finals[::choices_per_prompt]
    return responses.Usage(sum(o.num_prompt_tokens for o in firsts), sum(o.num_output_tokens for o in finals),
                           sum(o.num_cached_tokens for o in firsts))


def choices_of(generation: GenerationRequest, n: int) -> list[GenerationRequest]:
    """One generation per choice. A seeded request's choice i draws with seed + i, so the choices
    differ and the same request gives the same choices again."""
    if n == 1:
        return [generation]
    out = []
    for i in range(n):
        sampling = generation.sampling
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**63)
        out.append(dataclasses.replace(generation, request_id=f"{generation.request_id}-{i}", sampling=sampling))
    return out


def merge_choices(bodies: list[dict[str, Any]], usage: responses.Usage) -> dict[str, Any]:
    """One response body from single-choice bodies, choice i at index i, with the total usage."""
    body = bodies[0]
    for index, other in enumerate(bodies[1:], start=1):
        choice = other["choices"][0]
        choice["index"] = index
        body["choices"].append(choice)
    body["usage"] = usage.to_dict()
    return body
