"""HFEngine: the built-in engine. A step thread runs the scheduler and model; asyncio streams outputs.

The event loop never blocks on a forward pass: requests and aborts go to the step thread
through a queue, and each step's new tokens come back in one ``call_soon_threadsafe``.
Detokenisation and stop strings run on the loop, per request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import structlog

from tandem.engine.config import EngineConfig
from tandem.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from tandem.engine.hf.batch_wait import QuietGap
from tandem.engine.hf.block_manager import BlockManager
from tandem.engine.hf.disagg import DisaggregationMixin, TokenUpdate
from tandem.engine.hf.sequence import Sequence
from tandem.engine.types import (
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    StepInfo,
    TokenLogprob,
)
from tandem.errors import InvalidRequest, ResourceExhausted
from tandem.kv.events import KvEventLog, KvSnapshot, KvSubscription
from tandem.models import served_model_name

if TYPE_CHECKING:
    from tandem.engine.hf.scheduler import ScheduledSeq

log = structlog.get_logger(__name__)


_SHUTDOWN = object()


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class HFEngine(DisaggregationMixin):
    """PyTorch + transformers engine with continuous batching and a paged, prefix-caching KV pool."""

    def __init__(self, config: EngineConfig, on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.config = config
        self.model_name = served_model_name(config.model_path)
        self.max_model_len = config.max_model_len or 0
        self._on_step = on_step
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[TokenUpdate]] = {}
        self._reserved: dict[str, Sequence] = {}  # KV reservations not yet continued
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._recent_step_s = 0.0  # moving average of forward-pass times (the batch wait's bound)
        # The batch wait of an idle engine ends once no request came for the quiet gap (a lone request
        # pays the gap, not the wait); each arrival buys one more gap, up to batch_wait_ms in all.
        self._quiet_gap = QuietGap()
        self._arrivals_s: list[float] = []  # when the requests applied this loop turn reached the engine
        self._batch_wait_s: float | None = None  # the wait before the next step, for its StepInfo
        # Fed by the block pool on the step thread; streamed to the router (KV-aware routing).
        self._kv_events = KvEventLog()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="tandem-engine-step", daemon=True)
        self._thread.start()
        log.info("engine started", model=self.model_name, max_model_len=self.max_model_len,
                 num_kv_blocks=self.config.num_kv_blocks, block_size=self.config.block_size)

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from tandem.engine.hf.model_runner import ModelRunner
        from tandem.engine.hf.sampler import Sampler
        from tandem.engine.hf.scheduler import Scheduler

        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        cfg = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
        self.runner = ModelRunner(cfg.model_path, cfg.num_kv_blocks, cfg.block_size, cfg.device, cfg.dtype)
        model_len = self.runner.max_position_embeddings
        self.max_model_len = min(cfg.max_model_len or model_len, model_len)
        eos = self.runner.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.block_manager = BlockManager(cfg.num_kv_blocks, cfg.block_size, on_event=self._kv_events.record)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, eos_ids)
        self.sampler = Sampler(eos_token_ids=eos_ids)

    async def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(_SHUTDOWN)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # -- requests ------------------------------------------------------------------------------

    def _validate(self, request: EngineRequest) -> int:
        prompt = request.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens but the model's context is {self.max_model_len} "
                "tokens (including at least one generated token)", "prompt")
        if self.block_manager.blocks_for(len(prompt) + 1) > self.block_manager.num_blocks:
            raise InvalidRequest(
                f"the prompt needs more KV blocks than the pool holds ({self.block_manager.num_blocks})",
                "prompt")
        if request.request_id in self._streams:
            raise InvalidRequest(f"request id {request.request_id!r} is already running", "request_id")
        if len(self._streams) >= self.config.max_num_seqs + self.config.max_queue_len:
            raise ResourceExhausted(
                f"the engine queue is full ({self.config.max_queue_len} waiting); retry later")
        max_new = request.sampling.max_tokens or self.max_model_len
        return min(len(prompt) + max_new, self.max_model_len)

    def _new_sequence(self, request: EngineRequest, *, pin: bool = False) -> Sequence:
        max_total = self._validate(request)
        if pin:
            max_total = len(request.prompt_token_ids) + 1
        num_prompt = len(request.prompt_token_ids)
        if not 0 <= request.num_resumed_output_tokens < num_prompt:
            raise InvalidRequest(f"num_resumed_output_tokens must be in [0, {num_prompt}) (the prompt has "
                                 f"{num_prompt} tokens), got {request.num_resumed_output_tokens}",
                                 "num_resumed_output_tokens")
        return Sequence(request.request_id, list(request.prompt_token_ids), num_prompt,
                        request.sampling, max_total, arrival_s=time.monotonic(), pin_on_finish=pin,
                        output_start=num_prompt - request.num_resumed_output_tokens)

    def _open(self, request_id: str) -> asyncio.Queue[TokenUpdate]:
        updates: asyncio.Queue[TokenUpdate] = asyncio.Queue()
        self._streams[request_id] = updates
        return updates

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self.healthy():
            raise RuntimeError("the engine is not running")
        seq = self._new_sequence(request)
        updates = self._open(seq.request_id)
        self._commands.put(seq)
        async for out in self._relay(request, updates, []):
            yield out

    async def _relay(self, request: EngineRequest, updates: asyncio.Queue[TokenUpdate],
                     preset: list[TokenUpdate]) -> AsyncGenerator[RequestOutput, None]:
        """Turn a request's token updates into text deltas; abort it if the consumer leaves early.

        ``preset`` updates (a first token made elsewhere) are emitted before the engine's own.
        """
        rid = request.request_id
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        stops = StopStringMatcher(request.sampling.stop)
        num_prompt = len(request.prompt_token_ids)
        num_output = 0
        finished = False
        try:
            while not finished:
                update = preset.pop(0) if preset else await updates.get()
                token_ids = list(update.token_ids)
                logprobs = None if request.sampling.logprobs is None else list(update.logprobs or [])
                prompt_logprobs = update.prompt_logprobs
                reason = update.finish_reason
                while reason is None and not preset and not updates.empty():  # coalesce when the reader lags
                    more = updates.get_nowait()
                    prompt_logprobs = prompt_logprobs or more.prompt_logprobs
                    token_ids.extend(more.token_ids)
                    if logprobs is not None:
                        logprobs.extend(more.logprobs or [])
                    reason, update = more.finish_reason, more
                num_output += len(token_ids)
                text = detok.add(token_ids)
                if reason is not None:
                    text += detok.flush()
                text, stopped = stops.feed(text)
                if stopped:
                    reason = FinishReason.STOP
                    self._commands.put(("abort", rid))
                elif reason is not None:
                    text += stops.flush()
                finished = reason is not None
                if token_ids or text or finished:
                    yield RequestOutput(rid, token_ids, text, reason, num_prompt, num_output,
                                        update.num_cached_tokens, update.error, logprobs, prompt_logprobs)
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away: free the request's blocks
                self._commands.put(("abort", rid))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the step thread (which owns the scheduler and pool) and await its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._commands.put(("call", fn, future))
        return await future

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def kv_events(self) -> KvSubscription:
        """Blocks stored / removed / cleared from now on, numbered 1, 2, ... per engine."""
        return self._kv_events.subscribe()

    def kv_snapshot(self) -> KvSnapshot:
        """Every cached block hash, with the id of the last event it includes."""
        return self._kv_events.snapshot()

    def stats(self) -> EngineStats:
        if not hasattr(self, "scheduler"):
            return EngineStats(num_kv_blocks_total=self.config.num_kv_blocks, block_size=self.config.block_size)
        sched, blocks = self.scheduler, self.block_manager
        return EngineStats(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_kv_blocks_used=blocks.num_used_blocks,
            num_kv_blocks_total=blocks.num_blocks,
            num_free_queue_slots=max(0, self.config.max_num_seqs + self.config.max_queue_len - len(self._streams)),
            num_prefix_cache_queries=sched.num_prefix_queries,
            num_prefix_cache_hits=sched.num_prefix_hits,
            block_size=blocks.block_size,
            max_model_len=self.max_model_len,
        )

    # -- the step thread -----------------------------------------------------------------------

    def _emit(self, updates: dict[str, TokenUpdate]) -> None:
        if updates and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, updates)

    def _deliver(self, updates: dict[str, TokenUpdate]) -> None:
        for rid, update in updates.items():
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put_nowait(update)

    def _apply(self, command: object, updates: dict[str, TokenUpdate]) -> bool:
        """Apply one queued command; False on shutdown."""
        if command is _SHUTDOWN:
            return False
        if isinstance(command, Sequence):
            self.scheduler.add(command)
            self._arrivals_s.append(command.arrival_s)
            self._quiet_gap.arrived(command.arrival_s)
        elif isinstance(command, tuple) and command[0] == "abort":
            seq = self.scheduler.abort(command[1])
            if seq is not None:
                updates[seq.request_id] = TokenUpdate([], FinishReason.ABORT, seq.num_cached_tokens)
        elif isinstance(command, tuple) and command[0] == "release":
            self.scheduler.release_pinned(command[1])
        elif isinstance(command, tuple) and command[0] == "cancel-reservation":
            self.scheduler.cancel_reservation(command[1])
        elif isinstance(command, tuple) and command[0] == "call":
            _, fn, future = command
            try:
                result, error = fn(), None
            except Exception as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve, future, result, error)
        return True

    def _run(self) -> None:
        try:
            while True:
                updates: dict[str, TokenUpdate] = {}
                idle = block = not self.scheduler.has_work()
                self._arrivals_s.clear()
                while True:
                    try:
                        command = self._commands.get(block=block)
                    except queue.Empty:
                        break
                    if not self._apply(command, updates):
                        self._abort_all(FinishReason.ABORT, None)
                        return
                    block = False
                self._quiet_gap.settle()  # what came during the step after the last wait has come
                if idle and self.scheduler.has_work() and not self._gather_arrivals(updates):
                    self._abort_all(FinishReason.ABORT, None)
                    return
                if self.scheduler.has_work():
                    self._step(updates)
                self._emit(updates)
        except BaseException as exc:  # a broken step must not leave clients waiting forever
            self._error = exc
            log.exception("engine step failed; failing in-flight requests")
            self._abort_all(FinishReason.ERROR, f"engine failure: {exc}")

    def _gather_arrivals(self, updates: dict[str, TokenUpdate]) -> bool:
        """An idle engine that just got work waits briefly for more requests to prefill alongside.

        Requests a client sends together reach a worker up to a few ms apart (the frontend takes them
        one at a time: four arrived over 3.5 ms, median, on 2 cores), and one that misses the first
        step waits a whole step for its prefill (+110 ms TTFT at concurrency 4 on 2 cores). The wait
        ends after a quiet gap (3 ms or what bursts here have needed, at most 7.5% of a recent step:
        ``QuietGap``), so a lone request pays one gap; a burst keeps it going, arrival by arrival, for
        up to batch_wait_ms. (A whole wait capped at the gap, as before, is 1.5 ms with a GPU's 20 ms
        steps: shorter than a burst of 4 takes to come through the frontend.) The wait goes to the
        next step's StepInfo (batch_wait_s). False on shutdown.
        """
        limit_s = self.config.batch_wait_ms / 1e3
        gap_s = self._quiet_gap.gap_s(self._recent_step_s, limit_s)
        now = started = time.monotonic()
        end = now + limit_s
        deadline = now + gap_s
        try:
            while (remaining_s := deadline - now) > 0:
                try:
                    command = self._commands.get(timeout=remaining_s)
                except queue.Empty:
                    return True
                if not self._apply(command, updates):
                    return False
                now = time.monotonic()
                deadline = min(end, now + gap_s)
            return True
        finally:
            ended = time.monotonic()
            self._batch_wait_s = ended - started
            self._quiet_gap.gathered(sorted(self._arrivals_s), ended,
                                     self._quiet_gap.limit_s(self._recent_step_s, limit_s))

    def _step(self, updates: dict[str, TokenUpdate]) -> None:
        started = time.perf_counter()
        batch_wait_s, self._batch_wait_s = self._batch_wait_s, None
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return
        sampling = [item for item in scheduled if item.samples]
        logits, prompt_logits = self.runner.execute(scheduled)
        if prompt_logits is not None:
            self._score_prompts(scheduled, prompt_logits)
        params = [i.seq.sampling for i in sampling]
        histories = ([(i.seq.token_ids, i.seq.output_start, i.seq.num_prompt_tokens) for i in sampling]
                     if any(p.penalised for p in params) else None)
        tokens = self.sampler.sample(logits, params, [i.seq.num_tokens for i in sampling], histories)
        logprobs: dict[str, TokenLogprob] = {}
        if any(p.logprobs is not None for p in params):
            from tandem.engine.hf.sampler import token_logprobs  # torch is imported on start, not on import

            for item, logprob in zip(sampling, token_logprobs(logits, params, tokens), strict=True):
                if logprob is not None:
                    logprobs[item.seq.request_id] = logprob
        for seq in self.scheduler.postprocess(scheduled, tokens):
            pinned = list(seq.block_table) if seq.request_id in self.scheduler.pinned else []
            logprob = logprobs.get(seq.request_id)
            prompt_logprobs = None
            if seq.sampling.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
            updates[seq.request_id] = TokenUpdate([seq.token_ids[-1]], seq.finish_reason, seq.num_cached_tokens,
                                                  pinned_block_ids=pinned,
                                                  logprobs=None if logprob is None else [logprob],
                                                  prompt_logprobs=prompt_logprobs)
        duration_s = time.perf_counter() - started
        self._recent_step_s = duration_s if not self._recent_step_s else 0.8 * self._recent_step_s + 0.2 * duration_s
        if self._on_step is not None:
            num_tokens = sum(i.num_new_tokens for i in scheduled)
            prefill = sum(i.num_new_tokens for i in scheduled if i.num_new_tokens > 1)
            self._on_step(StepInfo(len(scheduled), num_tokens, prefill, duration_s, batch_wait_s))

    def _score_prompts(self, scheduled: list[ScheduledSeq], prompt_logits: Any) -> None:
        """Append each prompt_logprobs request's scores of this step's prompt positions."""
        from tandem.engine.hf.sampler import scored_logprobs  # torch is imported on start, not on import

        row = 0
        for item in scheduled:
            positions = item.prompt_logprob_positions
            if not positions:
                continue
            seq = item.seq
            targets = [seq.token_ids[p + 1] for p in positions]
            seq.prompt_logprobs.extend(scored_logprobs(prompt_logits[row : row + len(targets)], targets,
                                                       seq.sampling.prompt_logprobs or 0))
            row += len(targets)

    def _abort_all(self, reason: FinishReason, error: str | None) -> None:
        updates: dict[str, TokenUpdate] = {}
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.abort(seq.request_id)
            updates[seq.request_id] = TokenUpdate([], reason, seq.num_cached_tokens, error)
        self._emit(updates)
