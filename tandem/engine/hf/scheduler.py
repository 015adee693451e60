"""Continuous batching: which requests run in the next forward pass, and how many tokens each.

Every step, running requests go first (one token each when decoding, a chunk when a long
prompt is still being prefilled), then waiting requests join while the token budget, the
sequence limit and the KV pool allow. When the pool cannot grow a running request, the most
recently admitted one is preempted (its blocks freed, recomputed later from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tandem.engine.hf.block_manager import BlockManager
from tandem.engine.hf.sequence import Sequence, SequenceStatus
from tandem.engine.types import FinishReason
from tandem.kv.hashing import hash_blocks


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """After this step every known token is computed, so the next one is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions computed this step whose logits score the next prompt token (prompt_logprobs)."""
        seq = self.seq
        if not seq.wants_prompt_logprobs:
            return range(0)
        start = max(seq.num_computed_tokens, len(seq.prompt_logprobs))
        end = min(seq.num_computed_tokens + self.num_new_tokens, seq.num_prompt_tokens - 1)
        return range(start, max(start, end))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: set[int]) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # prompt tokens found cached
        self.num_preemptions = 0
        # prefilled requests whose blocks wait for a KV export, by request id
        self.pinned: dict[str, Sequence] = {}

    # -- admission -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.block_table:
            # Imported KV: its reserved blocks are in place and it needs at most one more. Queued
            # behind a request that waits for free blocks, it would hold the very blocks that
            # request waits for (a deadlock); ahead of it, it runs and frees them.
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.ABORT)
                return seq
        return None

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._grow(seq, num_new):
                victim = self.running.pop()  # latest admitted goes back to the queue
                self._preempt(victim)
                if victim is seq:
                    break
                continue
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            index += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, budget):
                break  # the pool is full: wait for running requests to free blocks
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return scheduled

    def _grow(self, seq: Sequence, num_new: int) -> bool:
        needed = self.blocks.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        if needed <= 0:
            return True
        if not self.blocks.can_allocate(needed):
            return False
        seq.block_table.extend(self.blocks.allocate(needed))
        return True

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Take the request's cached prefix and blocks for its first chunk, or nothing at all."""
        if seq.block_table:  # imported KV: its blocks are in place already
            return self._grow(seq, min(seq.num_uncomputed_tokens, budget))
        bs = self.blocks.block_size
        hashes = hash_blocks(seq.token_ids, bs)
        hits = self.blocks.find_prefix(hashes)
        if seq.wants_prompt_logprobs:
            hits = []  # cached blocks hold keys and values, not the logits each position scores with
        if len(hits) * bs >= seq.num_tokens:
            hits = hits[:-1]  # the last token must be computed to get logits for sampling
        num_cached = len(hits) * bs
        num_new = min(seq.num_tokens - num_cached, budget)
        needed = self.blocks.blocks_for(num_cached + num_new) - len(hits)
        if not self.blocks.can_allocate(needed, hits):
            return False
        self.blocks.take(hits)
        seq.block_table = hits + self.blocks.allocate(needed)
        seq.block_hashes = hashes[: len(hits)]
        seq.num_computed_tokens = num_cached
        if seq.num_output_tokens == 0:  # first admission, not a resumption after preemption
            seq.num_cached_tokens = num_cached
            self.num_prefix_queries += seq.num_tokens
            self.num_prefix_hits += num_cached
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- KV export and import (disaggregated prefill) ----------------------------------------

    def release_pinned(self, request_id: str) -> bool:
        seq = self.pinned.pop(request_id, None)
        if seq is None:
            return False
        self.blocks.free(seq.block_table)
        seq.block_table = []
        return True

    def reserve(self, seq: Sequence) -> bool:
        """Blocks for an imported prompt: local prefix hits plus fresh blocks for the rest.

        Sets ``num_cached_tokens`` (the part that needs no import); False when the pool is full.
        """
        bs = self.blocks.block_size
        num_prompt = seq.num_prompt_tokens
        hashes = hash_blocks(seq.token_ids[:num_prompt], bs)
        hits = self.blocks.find_prefix(hashes)
        needed = self.blocks.blocks_for(num_prompt) - len(hits)
        if not self.blocks.can_allocate(needed, hits):
            return False
        self.blocks.take(hits)
        seq.block_table = hits + self.blocks.allocate(needed)
        seq.block_hashes = hashes[: len(hits)]
        seq.num_cached_tokens = len(hits) * bs
        self.num_prefix_queries += num_prompt
        self.num_prefix_hits += seq.num_cached_tokens
        return True

    def cancel_reservation(self, seq: Sequence) -> None:
        if seq.block_table:
            self.blocks.free(seq.block_table)
        seq.block_table = []

    # -- after the forward pass ----------------------------------------------------------------

    def postprocess(self, scheduled: list[ScheduledSeq], sampled: list[int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens (in order of ``samples``), finish requests.

        Returns the sequences that got a new token this step.
        """
        updated: list[Sequence] = []
        tokens = iter(sampled)
        for item in scheduled:
            seq = item.seq
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register(seq.block_table, seq.token_ids[: seq.num_computed_tokens], seq.block_hashes)
            if not samples:
                continue
            token = next(tokens)
            seq.token_ids.append(token)
            updated.append(seq)
            reason = self.stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return updated

    def stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        """Whether ``token``, just appended to ``seq``, ends it (also used for a first token made elsewhere)."""
        if not seq.sampling.ignore_eos and token in self.eos_token_ids:
            return FinishReason.STOP
        if token in seq.sampling.stop_token_ids:
            return FinishReason.STOP
        if seq.num_tokens >= seq.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.pin_on_finish and reason is FinishReason.LENGTH:
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = reason
            self.pinned[seq.request_id] = seq  # blocks stay referenced until release_pinned
            return
        if seq.block_table:
            self.blocks.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
