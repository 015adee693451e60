"""The hf engine's disaggregation API: prefill with pinned blocks, KV export and import, and
continuing a request whose prompt was prefilled on another engine."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import torch

from tandem.engine.hf.sequence import Sequence
from tandem.engine.types import (
    EngineRequest,
    FinishReason,
    KVLayout,
    KVReservation,
    PrefillResult,
    RequestOutput,
    TokenLogprob,
)

if TYPE_CHECKING:
    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.block_manager import BlockManager
    from tandem.engine.hf.model_runner import ModelRunner
    from tandem.engine.hf.scheduler import Scheduler
    from tandem.kv.transfer.shared_pool import SharedKvPool

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class TokenUpdate:
    """New tokens of one request from one step (token ids only; text is made on the loop)."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    num_cached_tokens: int
    error: str | None = None
    pinned_block_ids: list[int] = field(default_factory=list)  # prefill role only
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # with a prompt_logprobs request's first token


class DisaggregationMixin:
    """Prefill role (``prefill``/``read_kv``/``release_kv``) and decode role (``reserve_kv``/
    ``write_kv``/``generate_imported``) of ``HFEngine``, which provides the state used here."""

    config: EngineConfig
    runner: ModelRunner
    scheduler: Scheduler
    block_manager: BlockManager
    _commands: queue.SimpleQueue[object]
    _streams: dict[str, asyncio.Queue[TokenUpdate]]
    _reserved: dict[str, Sequence]

    if TYPE_CHECKING:
        def _new_sequence(self, request: EngineRequest, *, pin: bool = False) -> Sequence: ...
        def _open(self, request_id: str) -> asyncio.Queue[TokenUpdate]: ...
        def _relay(self, request: EngineRequest, updates: asyncio.Queue[TokenUpdate],
                   preset: list[TokenUpdate]) -> AsyncGenerator[RequestOutput, None]: ...
        async def _call(self, fn: Callable[[], Any]) -> Any: ...

    def kv_layout(self) -> KVLayout:
        r = self.runner
        return KVLayout(r.num_layers, r.num_kv_heads, r.head_dim, r.block_size, self.config.dtype)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """Run the prompt and sample its first token; keep its blocks pinned for ``read_kv``.

        The caller must ``release_kv`` the request (after the export, or when its lease ends).
        Nothing is pinned when the first token already finishes the request.
        """
        seq = self._new_sequence(request, pin=True)
        updates = self._open(seq.request_id)
        self._commands.put(seq)
        try:
            update = await updates.get()
        except BaseException:
            self._commands.put(("abort", seq.request_id))
            self._commands.put(("release", seq.request_id))
            raise
        finally:
            self._streams.pop(seq.request_id, None)
        if update.finish_reason in (FinishReason.ABORT, FinishReason.ERROR):
            raise RuntimeError(update.error or "prefill aborted")
        reason: FinishReason | None = None if update.finish_reason is FinishReason.LENGTH else update.finish_reason
        if request.sampling.max_tokens == 1:
            reason = FinishReason.LENGTH
        return PrefillResult(seq.request_id, update.token_ids[-1], reason, seq.num_prompt_tokens,
                             update.num_cached_tokens, update.pinned_block_ids,
                             update.logprobs[-1] if update.logprobs else None)

    def read_kv(self, block_ids: list[int], layer_start: int, layer_count: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of K and V of ``block_ids`` for layers [start, start+count): [L, 2, B, bs, kvh, d].

        ``out`` (that shape, e.g. a shared-memory view) receives the copy when given. Safe from
        the event loop: pinned blocks are never written by the step thread.
        """
        return self.runner.read_blocks(block_ids, layer_start, layer_count, out)

    async def share_kv_pool(self, shm_dir: str) -> SharedKvPool | None:
        """Move the KV pool into a shared-memory file under ``shm_dir`` (after start()).

        A prefill worker's: decode workers on this host then copy pinned blocks straight out of it,
        and its exporter processes read it. A decode worker's: its pull helper processes write
        received blocks into it. The file is in ordinary pages, not the transparent huge pages of
        the private pool. None when the pool is not in host memory (a GPU pool stays where it is;
        transfers then go through staging).
        The caller closes the returned pool (removes the file) after the engine has stopped.
        """
        from tandem.kv.transfer.shared_pool import SharedKvPool

        runner = self.runner
        if runner.k_cache.device.type != "cpu":
            return None

        def move() -> SharedKvPool:  # on the step thread, between steps
            pool = SharedKvPool(shm_dir, self.kv_layout(), runner.k_cache.shape[1])
            pool.k.copy_(runner.k_cache)
            pool.v.copy_(runner.v_cache)
            runner.k_cache, runner.v_cache = pool.k, pool.v
            return pool

        shared: SharedKvPool = await self._call(move)
        return shared

    async def release_kv(self, request_id: str) -> None:
        """Unpin a prefilled request's blocks (after export, on lease expiry or cancellation)."""
        self._commands.put(("release", request_id))

    async def reserve_kv(self, request: EngineRequest) -> KVReservation | None:
        """Hold blocks for a prompt whose KV will be imported; None when the pool is full."""
        seq = self._new_sequence(request)
        ok = await self._call(lambda: self.scheduler.reserve(seq))
        if not ok:
            return None
        self._reserved[seq.request_id] = seq
        return KVReservation(seq.request_id, list(seq.block_table), seq.num_cached_tokens,
                             self.block_manager.block_size)

    async def cancel_reservation(self, reservation: KVReservation) -> None:
        """Free a reservation that will not be continued (the caller decided to prefill locally)."""
        seq = self._reserved.pop(reservation.request_id, None)
        if seq is not None:
            await self._call(lambda: self.scheduler.cancel_reservation(seq))

    def write_kv(self, reservation: KVReservation, block_index: int, layer_start: int,
                 data: torch.Tensor) -> None:
        """Copy imported K/V ([L, 2, B, bs, kvh, d]) into reserved blocks starting at ``block_index``."""
        blocks = reservation.block_ids[block_index : block_index + data.shape[2]]
        self.runner.write_blocks(blocks, layer_start, data)

    def import_kv_blocks(self, reservation: KVReservation, block_index: int, source_k: torch.Tensor,
                         source_v: torch.Tensor, source_block_ids: Seq[int]) -> None:
        """Copy blocks of a peer's shared pool ([layers, slots, kvh, d]) into reserved blocks from
        ``block_index`` on. Safe off the step thread: reserved blocks are not touched by steps."""
        from tandem.kv.transfer.shared_pool import copy_blocks

        targets = reservation.block_ids[block_index : block_index + len(source_block_ids)]
        copy_blocks(source_k, source_v, source_block_ids, self.runner.k_cache, self.runner.v_cache, targets,
                    self.runner.block_size)

    async def generate_imported(self, request: EngineRequest, reservation: KVReservation | None,
                                first_token_id: int,
                                load_kv: Callable[[KVReservation], Awaitable[None]] | None,
                                first_token_logprob: TokenLogprob | None = None
                                ) -> AsyncIterator[RequestOutput]:
        """Continue a request prefilled elsewhere: emit its first token at once, then import and decode.

        ``load_kv`` fills the reservation's missing blocks; if it fails (or there is no
        reservation) the prompt is prefilled here instead, with the same first token, so the
        output does not change.
        """
        rid = request.request_id
        seq = self._reserved.pop(rid, None) if reservation is not None else None
        if seq is None:
            seq = self._new_sequence(request)
        updates = self._open(rid)
        seq.token_ids.append(first_token_id)
        first_reason = self.scheduler.stop_reason(seq, first_token_id)
        preset = [TokenUpdate([first_token_id], first_reason, seq.num_cached_tokens,
                              logprobs=None if first_token_logprob is None else [first_token_logprob])]
        relay = self._relay(request, updates, preset)
        submitted = False
        try:
            yield await relay.__anext__()
            if first_reason is not None:
                return
            imported = False
            if seq.block_table and load_kv is not None and reservation is not None:
                try:
                    await load_kv(reservation)
                    imported = True
                except Exception as exc:  # fall back to a local prefill; the client sees no error
                    log.warning("KV import failed; prefilling locally", request_id=rid, error=str(exc))
            if imported:
                seq.num_computed_tokens = seq.num_prompt_tokens
            else:
                if seq.block_table:
                    await self._call(lambda: self.scheduler.cancel_reservation(seq))
                seq.num_computed_tokens = 0
                seq.num_cached_tokens = 0
            self._commands.put(seq)
            submitted = True
            async for out in relay:
                yield out
        finally:
            await relay.aclose()
            if not submitted and seq.block_table:  # never reached the scheduler: free the reservation
                self._commands.put(("cancel-reservation", seq))
