"""The router's prefix index: overlaps, events in order, gaps and resync, workers leaving."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.router.kv_index import ApplyOutcome, KvIndex
from tandem.kv.events import KvEvent, KvEventKind, KvSnapshot

pytestmark = pytest.mark.unit

STORED, REMOVED, CLEARED = KvEventKind.STORED, KvEventKind.REMOVED, KvEventKind.CLEARED


def _index(holdings: dict[str, list[int]]) -> KvIndex:
    index = KvIndex()
    for worker_id, hashes in holdings.items():
        index.add_worker(worker_id)
        index.store(worker_id, hashes)
    return index


@pytest.mark.parametrize(
    ("holdings", "prompt", "expected"),
    [
        ({"a": [1, 2, 3], "b": [1]}, [1, 2, 3, 4], {"a": 3, "b": 1}),
        ({"a": [1, 2, 3], "b": [1, 2, 3]}, [1, 2, 3], {"a": 3, "b": 3}),
        ({"a": [2, 3], "b": []}, [1, 2, 3], {"a": 0, "b": 0}),  # no first block: nothing counts
        ({"a": [1, 3]}, [1, 2, 3], {"a": 1}),  # a hole ends the prefix
        ({"a": [1, 2]}, [], {"a": 0}),
        ({"a": [5], "b": [1, 2], "c": [1, 2, 3]}, [1, 2, 3], {"a": 0, "b": 2, "c": 3}),
    ],
)
def test_overlap_is_the_number_of_leading_blocks_held(
    holdings: dict[str, list[int]], prompt: list[int], expected: dict[str, int]
) -> None:
    assert _index(holdings).overlaps(prompt) == expected


def test_overlaps_for_chosen_workers_only_and_zero_for_unknown_ones() -> None:
    index = _index({"a": [1, 2], "b": [1, 2]})
    assert index.overlaps([1, 2], ["b", "ghost"]) == {"b": 2, "ghost": 0}


def test_the_walk_stops_reading_the_prompt_once_every_worker_missed() -> None:
    index = _index({"a": [1, 2], "b": [1]})
    consumed: list[int] = []

    def prompt() -> Iterator[int]:
        for block_hash in range(1, 1000):
            consumed.append(block_hash)
            yield block_hash

    assert index.overlaps(prompt()) == {"a": 2, "b": 1}
    assert consumed == [1, 2, 3]  # hashing a long prompt stops at the first all-miss


@pytest.mark.parametrize(
    ("events", "prompt", "expected_overlap", "expected_blocks"),
    [
        ([(STORED, (1, 2, 3))], [1, 2, 3], 3, 3),
        ([(STORED, (1, 2, 3)), (REMOVED, (3,))], [1, 2, 3], 2, 2),
        ([(STORED, (1, 2, 3)), (REMOVED, (1,))], [1, 2, 3], 0, 2),
        ([(STORED, (1, 2)), (CLEARED, ()), (STORED, (7,))], [1, 2], 0, 1),
        ([(STORED, (1,)), (STORED, (1, 2))], [1, 2], 2, 2),  # a re-store is harmless
        ([(REMOVED, (9,))], [9], 0, 0),  # removing what it never held
    ],
)
def test_events_in_order_change_what_a_worker_holds(
    events: list[tuple[KvEventKind, tuple[int, ...]]], prompt: list[int], expected_overlap: int,
    expected_blocks: int,
) -> None:
    index = _index({"w": []})
    outcomes = [index.apply("w", KvEvent(i, kind, hashes)) for i, (kind, hashes) in enumerate(events, 1)]
    assert set(outcomes) == {ApplyOutcome.APPLIED}
    assert index.overlaps(prompt) == {"w": expected_overlap}
    assert index.num_worker_blocks("w") == expected_blocks
    assert index.last_event_id("w") == len(events)


def test_a_removal_by_one_worker_leaves_the_others_holding_the_block() -> None:
    index = _index({"a": [1, 2], "b": [1, 2]})
    index.apply("a", KvEvent(1, REMOVED, (1, 2)))
    assert index.overlaps([1, 2]) == {"a": 0, "b": 2}
    assert index.num_blocks == 2 and index.num_entries == 2


def test_a_replayed_event_is_ignored() -> None:
    index = _index({"w": []})
    index.apply("w", KvEvent(1, STORED, (1,)))
    index.apply("w", KvEvent(2, REMOVED, (1,)))
    assert index.apply("w", KvEvent(1, STORED, (1,))) is ApplyOutcome.STALE
    assert index.overlaps([1]) == {"w": 0}


def test_events_of_an_unknown_worker_are_refused() -> None:
    assert KvIndex().apply("nobody", KvEvent(1, STORED, (1,))) is ApplyOutcome.UNKNOWN_WORKER


def test_a_gap_buffers_events_until_a_snapshot_then_replays_the_newer_ones() -> None:
    index = _index({"w": []})
    index.apply("w", KvEvent(1, STORED, (1, 2)))
    assert index.apply("w", KvEvent(4, STORED, (5,))) is ApplyOutcome.GAP  # 2 and 3 were lost
    assert index.needs_resync("w")
    assert index.apply("w", KvEvent(5, REMOVED, (1,))) is ApplyOutcome.BUFFERED
    # The snapshot reflects events up to 3 (block 1 stored, 2 dropped, 3 and 4 stored).
    outcome = index.apply_snapshot("w", KvSnapshot(3, (1, 3, 4)))
    assert outcome is ApplyOutcome.APPLIED and not index.needs_resync("w")
    assert index.last_event_id("w") == 5
    assert index.overlaps([3, 4, 5]) == {"w": 3}  # 4 and 5 replayed on top of the snapshot
    assert index.overlaps([1]) == {"w": 0}  # removed by the replayed event 5
    assert index.overlaps([2]) == {"w": 0}  # the snapshot dropped it


def test_buffered_events_already_in_the_snapshot_are_skipped() -> None:
    index = _index({"w": []})
    index.apply("w", KvEvent(3, STORED, (1,)))  # a router that joined late: gap from 0
    index.apply("w", KvEvent(4, REMOVED, (1,)))
    assert index.apply_snapshot("w", KvSnapshot(4, (2,))) is ApplyOutcome.APPLIED
    assert index.overlaps([2]) == {"w": 1} and index.overlaps([1]) == {"w": 0}


def test_a_snapshot_older_than_the_buffered_events_asks_for_another() -> None:
    index = _index({"w": []})
    index.apply("w", KvEvent(5, STORED, (1,)))
    assert index.apply_snapshot("w", KvSnapshot(2, ())) is ApplyOutcome.GAP
    assert index.needs_resync("w")
    assert index.apply_snapshot("w", KvSnapshot(5, (1,))) is ApplyOutcome.APPLIED
    assert index.overlaps([1]) == {"w": 1}


def test_a_snapshot_keeps_other_workers_bits_on_shared_blocks() -> None:
    index = _index({"a": [1, 2], "b": [1, 2]})
    index.apply("a", KvEvent(9, STORED, ()))
    index.apply_snapshot("a", KvSnapshot(9, (3,)))
    assert index.overlaps([1, 2]) == {"a": 0, "b": 2}
    assert index.overlaps([3]) == {"a": 1, "b": 0}


def test_a_worker_that_leaves_takes_its_blocks_and_its_slot_comes_back_empty() -> None:
    index = _index({"a": [1, 2, 3], "b": [1]})
    assert index.remove_worker("a") == 3
    assert "a" not in index
    assert index.num_blocks == 1
    index.add_worker("c")  # reuses a's bit
    assert index.overlaps([1, 2, 3]) == {"b": 1, "c": 0}
    assert index.remove_worker("a") == 0


def test_adding_a_worker_twice_keeps_its_blocks() -> None:
    index = _index({"a": [1]})
    index.add_worker("a")
    assert index.overlaps([1]) == {"a": 1}


def test_many_workers_each_get_their_own_bit() -> None:
    holdings = {f"w{i:02d}": list(range(1, i + 1)) for i in range(70)}  # beyond 64 bits too
    index = _index(holdings)
    assert index.overlaps(list(range(1, 100))) == {worker_id: len(h) for worker_id, h in holdings.items()}
