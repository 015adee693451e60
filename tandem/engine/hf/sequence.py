"""One request's state inside the engine: its tokens, how many are computed, its KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tandem.engine.types import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    sampling: SamplingParams
    max_total_tokens: int  # prompt + max_tokens, capped at the model's context
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    num_cached_tokens: int = 0  # prompt tokens that were prefix-cache hits
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    arrival_s: float = 0.0
    # prefill role: keep the blocks after the first token, for a KV export (see Scheduler.pinned)
    pin_on_finish: bool = False
    # where the output starts for penalties and min_tokens: before num_prompt_tokens when the
    # request resumed here with its earlier output appended to the prompt
    output_start: int = -1
    # prompt_logprobs: those of prompt tokens 1, 2, ... computed so far; handed out with the first token
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        if self.output_start < 0:
            self.output_start = self.num_prompt_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt positions of this request still need their logits kept."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
