"""Domain types the engines speak; the services translate them to and from protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tandem.errors import InvalidRequest


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class SamplingParams:
    """How tokens are chosen and when generation stops. Validated on construction."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: minus this from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI: minus this per occurrence in the output
    repetition_penalty: float = 1.0  # transformers/vLLM: scales logits of prompt and output tokens
    min_tokens: int = 0  # EOS and stop token ids cannot end the request earlier
    logprobs: int | None = None  # each token's log-probability and this many alternatives; None: off
    # Each prompt token's log-probability given the tokens before it, and this many alternatives
    # (how likelihood is scored: OpenAI's echo with logprobs, vLLM's prompt_logprobs); None: off.
    # Such a request computes its whole prompt: no prefix-cache hit has the logits.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables), got {self.top_k}", "top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be in [0, 2^63), got {self.seed}", "seed")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", "stop")
        if len(self.stop) > 16:
            raise InvalidRequest(f"at most 16 stop strings, got {len(self.stop)}", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # also rejects NaN
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty must be in (0, 10] (1 is off), got {self.repetition_penalty}",
                                 "repetition_penalty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}",
                                 "prompt_logprobs")
        if self.min_tokens < 0:
            raise InvalidRequest(f"min_tokens must be >= 0, got {self.min_tokens}", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                                 "min_tokens")

    @property
    def penalised(self) -> bool:
        """Whether any penalty or min_tokens changes the logits (the plain path skips all of it)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, penalties and
    filtering, as vLLM's default) and the ``top`` alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The last this many prompt tokens are output generated elsewhere before a migration: penalties
    # and min_tokens count them as output.
    num_resumed_output_tokens: int = 0


@dataclass(slots=True)
class RequestOutput:
    """One streamed update of a request: new tokens and text since the previous one."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id when the request asked for them
    # On the first output of a request that asked for prompt_logprobs: one per prompt token after
    # the first (which has nothing before it to be predicted from).
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_free_queue_slots: int = 0
    num_prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    num_prefix_cache_hits: int = 0  # prompt tokens found there
    block_size: int = 16
    max_model_len: int = 0


@dataclass(slots=True, frozen=True)
class StepInfo:
    """What one forward pass did; reported to the worker's metrics."""

    num_seqs: int  # requests in the batch
    num_tokens: int  # tokens computed (prefill chunks + one per decoding request)
    num_prefill_tokens: int
    duration_s: float
    # How long the idle engine waited for more requests before this step (the batch wait); None
    # when the step followed another step, not a wait.
    batch_wait_s: float | None = None


@dataclass(slots=True, frozen=True)
class KVLayout:
    """Shape of one engine's KV pool, so two engines can check they can exchange blocks."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def bytes_per_block_layer(self) -> int:
        """K and V of one block in one layer."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


@dataclass(slots=True)
class PrefillResult:
    """A prompt run on a prefill engine: its first token and the blocks pinned for export."""

    request_id: str
    first_token_id: int
    finish_reason: FinishReason | None  # set when the first token already ends the request
    num_prompt_tokens: int
    num_cached_tokens: int
    block_ids: list[int]  # pinned until release_kv(request_id)
    first_token_logprob: TokenLogprob | None = None  # when the request asked for logprobs


@dataclass(slots=True)
class KVReservation:
    """Blocks a decode engine holds for an imported prompt.

    Blocks before ``num_cached_tokens // block_size`` are local prefix-cache hits; the rest must
    be filled with ``write_kv`` before the request continues.
    """

    request_id: str
    block_ids: list[int]
    num_cached_tokens: int
    block_size: int

    @property
    def first_missing_block(self) -> int:
        return self.num_cached_tokens // self.block_size
