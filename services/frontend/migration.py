"""In-flight request migration: what the frontend keeps of a stream so that another worker can
continue it after a failure, with no token duplicated or lost and the same text.

A migrated request is resubmitted as prompt + tokens generated so far, with the remaining
``max_tokens``. Sampling draws depend only on (seed, position), so greedy and seeded requests
continue exactly as they would have. The new worker's text would start from different context (it
sees the generated tokens as prompt and has not held back what the old worker held back), so after
a migration the frontend detokenises the new worker's tokens itself, from the state the old
worker's detokenizer and stop-string matcher had: replaying the same deltas rebuilds that state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import structlog

from tandem.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tandem.engine.types import FinishReason, RequestOutput, SamplingParams

log = structlog.get_logger(__name__)


class ResumedText:
    """Text of a migrated request's new tokens, continuing exactly where the client's text stopped.

    Built by replaying the deltas already streamed (token ids grouped as the worker grouped them,
    since the detokenizer's state depends on the grouping), then fed each new delta.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], token_chunks: Sequence[Sequence[int]],
                 stop: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = StopStringMatcher(stop)
        self.replayed_text = "".join(self._step(chunk, False)[0] for chunk in token_chunks)

    def _step(self, token_ids: Sequence[int], finished: bool) -> tuple[str, bool]:
        text = self._detokenizer.add(token_ids)
        if finished:
            text += self._detokenizer.flush()
        text, stopped = self._stops.feed(text)
        if finished and not stopped:
            text += self._stops.flush()
        return text, stopped

    def feed(self, token_ids: Sequence[int], finished: bool) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the request) for one new delta.

        A stop string that began before the migration and ends after it is found here, which the
        new worker, blind to the earlier text, cannot do.
        """
        return self._step(token_ids, finished)


@dataclasses.dataclass(slots=True)
class StreamProgress:
    """One request across every worker that served it: what the client got, and what is left."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_model_len: int
    token_chunks: list[list[int]] = dataclasses.field(default_factory=list)
    num_output_tokens: int = 0
    num_chars_sent: int = 0
    num_cached_tokens: int = 0
    num_migrations: int = 0
    resumed: ResumedText | None = None

    @property
    def generated_token_ids(self) -> list[int]:
        return [token_id for chunk in self.token_chunks for token_id in chunk]

    def worker_prompt(self) -> list[int]:
        """What the next worker is asked to continue: the prompt and every token generated so far."""
        return self.prompt_token_ids + self.generated_token_ids

    def worker_sampling(self) -> SamplingParams:
        """The request's sampling with the tokens already generated taken off max_tokens and min_tokens."""
        if not self.num_output_tokens:
            return self.sampling
        max_tokens = self.sampling.max_tokens
        return dataclasses.replace(
            self.sampling, max_tokens=None if max_tokens is None else max_tokens - self.num_output_tokens,
            min_tokens=max(0, self.sampling.min_tokens - self.num_output_tokens),
            prompt_logprobs=None)  # they came with the first token

    def finished_without_worker(self) -> FinishReason | None:
        """LENGTH when the failure came after the last token but before the worker said so."""
        if self.sampling.max_tokens is not None and self.num_output_tokens >= self.sampling.max_tokens:
            return FinishReason.LENGTH
        if len(self.prompt_token_ids) + self.num_output_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def start_migration(self, tokenizer: Any) -> None:
        """Called before the request goes to another worker; rebuilds the text state once tokens exist."""
        self.num_migrations += 1
        if not self.num_output_tokens:
            return  # nothing streamed yet: the next worker starts from scratch, like the first
        self.resumed = ResumedText(tokenizer, self.prompt_token_ids, self.token_chunks, self.sampling.stop)
        if len(self.resumed.replayed_text) != self.num_chars_sent:
            # Only a tokenizer whose decoding depends on more than the replayed context gets here.
            log.warning("replayed text differs from what was streamed", replayed=len(self.resumed.replayed_text),
                        streamed=self.num_chars_sent)

    def accept(self, output: RequestOutput) -> RequestOutput | None:
        """Turn a worker's output into the client's: its own text after a migration, the request's own
        counts. None when there is nothing to send (text held back, no token)."""
        self.token_chunks.append(list(output.token_ids))
        self.num_output_tokens += len(output.token_ids)
        text, finish_reason = output.text, output.finish_reason
        if self.resumed is not None:
            text, stopped = self.resumed.feed(output.token_ids, output.finished)
            if stopped:
                finish_reason = FinishReason.STOP
        if output.num_cached_tokens:
            self.num_cached_tokens = min(output.num_cached_tokens, len(self.prompt_token_ids))
        self.num_chars_sent += len(text)
        if not output.token_ids and not text and finish_reason is None:
            return None
        return RequestOutput(
            request_id=output.request_id, token_ids=list(output.token_ids), text=text,
            finish_reason=finish_reason, num_prompt_tokens=len(self.prompt_token_ids),
            num_output_tokens=self.num_output_tokens, num_cached_tokens=self.num_cached_tokens,
            error=output.error, logprobs=output.logprobs, prompt_logprobs=output.prompt_logprobs,
        )

    def final_output(self, request_id: str, finish_reason: FinishReason) -> RequestOutput:
        """The last output when the request finished without another worker (see finished_without_worker)."""
        text = ""
        if self.resumed is not None:
            text, _ = self.resumed.feed([], True)
        self.num_chars_sent += len(text)
        return RequestOutput(request_id=request_id, token_ids=[], text=text, finish_reason=finish_reason,
                             num_prompt_tokens=len(self.prompt_token_ids), num_output_tokens=self.num_output_tokens,
                             num_cached_tokens=self.num_cached_tokens)
