"""The scheduler with KV reservations (disaggregated prefill): imported requests never wait behind queued ones."""

from __future__ import annotations

import pytest

from tandem.engine.hf.block_manager import BlockManager
from tandem.engine.hf.scheduler import Scheduler
from tandem.engine.hf.sequence import Sequence
from tandem.engine.types import FinishReason, SamplingParams

pytestmark = pytest.mark.unit

BS = 4


def make_seq(rid: str, prompt: list[int], max_tokens: int = 2) -> Sequence:
    return Sequence(rid, list(prompt), len(prompt), SamplingParams(max_tokens=max_tokens, temperature=0),
                    len(prompt) + max_tokens)


def test_an_imported_request_runs_before_a_queued_one_that_waits_for_its_blocks() -> None:
    sched = Scheduler(BlockManager(10, BS), max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids={0})
    imported = make_seq("imported", list(range(1, 25)))  # 6 blocks, reserved while its KV is pulled
    assert sched.reserve(imported)
    local = make_seq("local", list(range(100, 124)))  # needs 6 blocks: only 4 are free
    sched.add(local)
    assert sched.schedule() == []  # waits for blocks
    imported.token_ids.append(7)  # the first token, sampled by the prefill worker
    imported.num_computed_tokens = imported.num_prompt_tokens  # the pull filled the reservation
    sched.add(imported)
    for _ in range(20):
        if not sched.has_work():
            break
        scheduled = sched.schedule()
        assert scheduled, "deadlock: nothing schedulable"
        sched.postprocess(scheduled, [7] * sum(item.samples for item in scheduled))
    assert imported.finish_reason is FinishReason.LENGTH and local.finish_reason is FinishReason.LENGTH
    assert sched.blocks.num_used_blocks == 0
