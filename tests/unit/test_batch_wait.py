"""The batch wait's quiet gap: what it starts at, how it learns from bursts, and its bounds."""

from __future__ import annotations

import pytest

from tandem.engine.hf.batch_wait import QuietGap

MS = 1e-3


def test_the_gap_starts_at_3_ms_and_never_exceeds_its_share_of_a_step_or_the_wait() -> None:
    gap = QuietGap()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(3 * MS)
    assert gap.gap_s(recent_step_s=0.02, limit_s=8 * MS) == pytest.approx(1.5 * MS)  # 7.5% of a GPU's step
    assert gap.gap_s(recent_step_s=0.1, limit_s=1 * MS) == pytest.approx(1 * MS)


def test_a_near_miss_widens_the_gap_to_catch_it_next_time() -> None:
    gap = QuietGap()
    gap.gathered([0.0, 0.5 * MS], ended_s=3.5 * MS, max_gap_s=7.5 * MS)
    gap.arrived(5 * MS)  # 4.5 ms after the last arrival: missed the step
    gap.settle()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(6.75 * MS)  # 1.5 x 4.5 ms


def test_a_request_long_after_the_burst_is_not_a_miss() -> None:
    gap = QuietGap()
    gap.gathered([0.0], ended_s=3 * MS, max_gap_s=7.5 * MS)
    gap.arrived(50 * MS)  # another request, not the burst's straggler
    gap.settle()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(3 * MS)


def test_wide_gaps_inside_a_burst_widen_the_gap_before_anything_misses() -> None:
    gap = QuietGap()
    gap.gathered([0.0, 2.5 * MS, 5 * MS], ended_s=8 * MS, max_gap_s=7.5 * MS)
    gap.settle()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(3.75 * MS)


def test_tight_bursts_shrink_a_learned_gap_back_to_3_ms() -> None:
    gap = QuietGap()
    gap.gathered([0.0], ended_s=3 * MS, max_gap_s=7.5 * MS)
    gap.arrived(7 * MS)
    gap.settle()
    widened = gap.gap_s(recent_step_s=0.1, limit_s=8 * MS)
    assert widened == pytest.approx(7.5 * MS)  # 1.5 x 7 ms, held to 7.5% of the step
    gap.gathered([0.0, 0.1 * MS], ended_s=3 * MS, max_gap_s=7.5 * MS)
    gap.settle()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(0.9 * widened)
    for _ in range(20):
        gap.gathered([0.0, 0.1 * MS], ended_s=3 * MS, max_gap_s=7.5 * MS)
        gap.settle()
    assert gap.gap_s(recent_step_s=0.1, limit_s=8 * MS) == pytest.approx(3 * MS)


def test_an_arrival_before_the_wait_ended_is_no_miss() -> None:
    gap = QuietGap()
    gap.gathered([0.0], ended_s=3 * MS, max_gap_s=7.5 * MS)
    gap.arrived(2 * MS)  # applied late, but it came in time
    gap.settle()
    assert gap.learned_s == 0.0
