"""Scheduler: token budget, chunked prefill, prefix hits, waiting for blocks, preemption, no leaks."""

from __future__ import annotations

import pytest

from tandem.engine.hf.block_manager import BlockManager
from tandem.engine.hf.scheduler import Scheduler
from tandem.engine.hf.sequence import Sequence
from tandem.engine.types import FinishReason, SamplingParams

pytestmark = pytest.mark.unit

BS = 4
EOS = 0


def make_seq(rid: str, prompt: list[int], max_tokens: int = 4, **sampling: object) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, **sampling)  # type: ignore[arg-type]
    return Sequence(rid, list(prompt), len(prompt), params, len(prompt) + max_tokens)


def run_to_end(sched: Scheduler, next_token: int = 7, max_steps: int = 200) -> int:
    steps = 0
    while sched.has_work() and steps < max_steps:
        scheduled = sched.schedule()
        sched.postprocess(scheduled, [next_token] * sum(s.samples for s in scheduled))
        steps += 1
    return steps


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=8, eos_token_ids={EOS})
    seq = make_seq("a", list(range(1, 21)), max_tokens=2)
    sched.add(seq)
    first = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens, s.samples) for s in first] == [("a", 8, False)]
    sched.postprocess(first, [])
    second = sched.schedule()
    assert second[0].num_new_tokens == 8
    sched.postprocess(second, [])
    third = sched.schedule()
    assert third[0].num_new_tokens == 4 and third[0].samples
    run_to_end(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 2
    assert sched.blocks.num_used_blocks == 0


def test_decodes_share_a_step_with_a_new_prefill() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=16, eos_token_ids={EOS})
    a = make_seq("a", [1, 2, 3], max_tokens=5)
    sched.add(a)
    sched.postprocess(sched.schedule(), [7])
    b = make_seq("b", [4, 5, 6, 7, 8], max_tokens=5)
    sched.add(b)
    step = sched.schedule()
    assert [(s.seq.request_id, s.num_new_tokens) for s in step] == [("a", 1), ("b", 5)]
    run_to_end(sched)
    assert sched.blocks.num_used_blocks == 0


def test_prefix_hit_skips_cached_blocks_but_computes_the_last_token() -> None:
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids={EOS})
    prompt = list(range(1, 13))  # three full blocks
    sched.add(make_seq("a", prompt, max_tokens=1))
    run_to_end(sched)
    again = make_seq("b", prompt, max_tokens=1)
    sched.add(again)
    step = sched.schedule()
    # all three blocks are cached, but the last must be recomputed to get logits
    assert again.num_cached_tokens == 8 and step[0].num_new_tokens == 4
    sched.postprocess(step, [7])
    assert sched.num_prefix_hits == 8 and sched.num_prefix_queries == 24
    assert sched.blocks.num_used_blocks == 0


def test_requests_wait_for_blocks_instead_of_failing() -> None:
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=64, eos_token_ids={EOS})
    seqs = [make_seq(f"r{i}", list(range(1 + i * 10, 9 + i * 10)), max_tokens=4) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    step = sched.schedule()
    assert len(step) == 2 and len(sched.waiting) == 1  # two 8-token prompts fill the 4-block pool
    run_to_end(sched)
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert sched.blocks.num_used_blocks == 0


def test_preemption_when_running_requests_outgrow_the_pool() -> None:
    sched = Scheduler(BlockManager(4, BS), max_num_seqs=8, max_num_batched_tokens=64, eos_token_ids={EOS})
    a = make_seq("a", [1, 2, 3, 4, 5, 6, 7], max_tokens=6)
    b = make_seq("b", [11, 12, 13, 14, 15, 16, 17], max_tokens=6)
    sched.add(a)
    sched.add(b)
    run_to_end(sched)
    assert sched.num_preemptions >= 1
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6
    assert sched.blocks.num_used_blocks == 0


def test_stop_conditions() -> None:
    sched = Scheduler(BlockManager(16, BS), max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids={EOS})
    eos = make_seq("eos", [1, 2], max_tokens=10)
    ignore = make_seq("ignore", [1, 2], max_tokens=3, ignore_eos=True)
    stop_id = make_seq("stop-id", [1, 2], max_tokens=10, stop_token_ids=[9])
    for seq in (eos, ignore):
        sched.add(seq)
    run_to_end(sched, next_token=EOS)
    sched.add(stop_id)
    run_to_end(sched, next_token=9)
    assert eos.finish_reason is FinishReason.STOP and eos.num_output_tokens == 1
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.num_output_tokens == 3
    assert stop_id.finish_reason is FinishReason.STOP


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    sched = Scheduler(BlockManager(16, BS), max_num_seqs=1, max_num_batched_tokens=64, eos_token_ids={EOS})
    sched.add(make_seq("run", [1, 2, 3, 4, 5], max_tokens=50))
    sched.add(make_seq("wait", [6, 7, 8], max_tokens=50))
    sched.postprocess(sched.schedule(), [7])
    assert sched.blocks.num_used_blocks > 0
    assert sched.abort("run") is not None
    assert sched.abort("wait") is not None
    assert sched.abort("unknown") is None
    assert not sched.has_work() and sched.blocks.num_used_blocks == 0
