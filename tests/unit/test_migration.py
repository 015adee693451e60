"""Migration bookkeeping with the real tokenizer: whatever token a stream breaks at, the client's text
equals the text of a stream that never broke (word boundaries, multi-byte characters, stop strings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.frontend.migration import StreamProgress
from tandem.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tandem.engine.types import FinishReason, RequestOutput, SamplingParams, TokenLogprob

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def worker_outputs(tokenizer: Any, prompt: list[int], generated: list[int], stop: list[str]) -> list[RequestOutput]:
    """What a worker streams for ``generated``, one token per delta, as the engine's _relay does."""
    detokenizer, stops = IncrementalDetokenizer(tokenizer, prompt), StopStringMatcher(stop)
    outputs = []
    for i, token_id in enumerate(generated):
        last = i == len(generated) - 1
        text = detokenizer.add([token_id]) + (detokenizer.flush() if last else "")
        text, stopped = stops.feed(text)
        reason = FinishReason.STOP if stopped else (FinishReason.LENGTH if last else None)
        if last and not stopped:
            text += stops.flush()
        outputs.append(RequestOutput("r", [token_id], text, reason, len(prompt), i + 1))
        if stopped:
            break
    return outputs


def client_text(tokenizer: Any, prompt: list[int], generated: list[int], stop: list[str], break_at: int,
                max_tokens: int) -> tuple[str, RequestOutput]:
    """The client's text when the first worker breaks after ``break_at`` tokens and a second continues."""
    progress = StreamProgress(list(prompt), SamplingParams(max_tokens=max_tokens, stop=stop), max_model_len=4096)
    texts = []
    last = None
    for output in worker_outputs(tokenizer, prompt, generated, stop)[:break_at]:
        sent = progress.accept(output)
        if sent is not None:
            texts.append(sent.text)
            last = sent
    if last is not None and last.finished:
        return "".join(texts), last
    progress.start_migration(tokenizer)
    assert progress.worker_prompt() == prompt + generated[:break_at]
    assert progress.worker_sampling().max_tokens == max_tokens - break_at
    # The second worker sees the generated tokens as prompt: its own text would start differently.
    for output in worker_outputs(tokenizer, progress.worker_prompt(), generated[break_at:], stop):
        sent = progress.accept(output)
        if sent is not None:
            texts.append(sent.text)
            last = sent
            if sent.finished:
                break
    assert last is not None
    return "".join(texts), last


@pytest.mark.parametrize(("text", "stop"), [
    (" The quick brown fox jumps over the lazy dog, then naps in the sun.", []),
    (" Café crème 😀 and 漢字 are multi-byte; so is naïve — yes.", []),
    (" Roses are red.\nViolets are blue. END of poem, more text after.", ["END of"]),
    (" alpha beta gamma delta", ["gamma d", "zzz"]),
])
def test_text_is_identical_wherever_the_stream_breaks(tokenizer: Any, text: str, stop: list[str]) -> None:
    prompt = tokenizer.encode("Write something:")
    generated = tokenizer.encode(text)
    reference = "".join(output.text for output in worker_outputs(tokenizer, prompt, generated, stop))
    for break_at in range(1, len(generated)):
        migrated, last = client_text(tokenizer, prompt, generated, stop, break_at, max_tokens=len(generated))
        assert migrated == reference, f"broke after {break_at} tokens"
        assert last.finished and last.num_prompt_tokens == len(prompt)
    if stop:
        assert stop[0] not in reference and reference  # the stop string ended it, whole or across the break


def test_counts_are_the_requests_not_the_workers(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Count:")
    generated = tokenizer.encode(" one two three four five six")
    _, last = client_text(tokenizer, prompt, generated, [], break_at=3, max_tokens=len(generated))
    assert last.num_output_tokens == len(generated)
    assert last.num_prompt_tokens == len(prompt)  # not prompt + the 3 tokens the second worker was given


def test_a_break_after_the_last_token_finishes_without_another_worker(tokenizer: Any) -> None:
    progress = StreamProgress([1, 2, 3], SamplingParams(max_tokens=2), max_model_len=100)
    for token_id in (40, 41):
        progress.accept(RequestOutput("r", [token_id], "x", None, 3, 0))
    progress.start_migration(tokenizer)
    assert progress.finished_without_worker() is FinishReason.LENGTH
    final = progress.final_output("r", FinishReason.LENGTH)
    assert final.finished and final.num_output_tokens == 2 and final.token_ids == []


def test_context_full_also_finishes_without_another_worker() -> None:
    progress = StreamProgress([1, 2, 3], SamplingParams(max_tokens=None), max_model_len=5)
    assert progress.finished_without_worker() is None
    progress.accept(RequestOutput("r", [7, 8], "", None, 3, 2))
    assert progress.finished_without_worker() is FinishReason.LENGTH
    assert progress.worker_sampling().max_tokens is None


def test_no_token_yet_means_a_plain_reroute(tokenizer: Any) -> None:
    progress = StreamProgress([1, 2, 3], SamplingParams(max_tokens=8, seed=5, temperature=1.0), max_model_len=100)
    progress.start_migration(tokenizer)
    assert progress.resumed is None and progress.worker_prompt() == [1, 2, 3]
    assert progress.worker_sampling() == SamplingParams(max_tokens=8, seed=5, temperature=1.0)


def test_prompt_logprobs_are_asked_for_until_they_came(tokenizer: Any) -> None:
    # They come with the first token; a worker that continues the request must not score its
    # prompt (the original prompt plus earlier output) again.
    sampling = SamplingParams(max_tokens=8, prompt_logprobs=1, logprobs=1)
    progress = StreamProgress([1, 2, 3], sampling, max_model_len=100)
    assert progress.worker_sampling().prompt_logprobs == 1  # nothing streamed yet: ask again
    scores = [TokenLogprob(2, -1.0), TokenLogprob(3, -2.0)]
    out = progress.accept(RequestOutput("r", [7], "", None, 3, 1, logprobs=[TokenLogprob(7, -0.5)],
                                        prompt_logprobs=scores))
    assert out is not None and out.prompt_logprobs == scores
    progress.start_migration(tokenizer)
    resumed = progress.worker_sampling()
    assert resumed.prompt_logprobs is None and resumed.logprobs == 1 and resumed.max_tokens == 7
