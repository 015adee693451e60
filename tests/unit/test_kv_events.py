"""KvEventLog: numbering, snapshots that agree with the ids, fan-out, and loss for slow readers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.router.kv_index import ApplyOutcome, KvIndex
from tandem.kv.events import KvEvent, KvEventKind, KvEventLog, KvSnapshot

pytestmark = pytest.mark.unit


def test_events_are_numbered_from_one_without_gaps() -> None:
    log = KvEventLog()
    events = [log.record("stored", [1, 2]), log.record("removed", [1]), log.record("cleared", [])]
    assert [event.event_id for event in events] == [1, 2, 3]
    assert events[0] == KvEvent(1, KvEventKind.STORED, (1, 2))
    assert events[2].block_hashes == ()


@pytest.mark.parametrize(
    ("changes", "cached", "last_event_id"),
    [
        ([], set(), 0),
        ([("stored", [1, 2, 3])], {1, 2, 3}, 1),
        ([("stored", [1, 2, 3]), ("removed", [2])], {1, 3}, 2),
        ([("stored", [1, 2]), ("cleared", []), ("stored", [5])], {5}, 3),
    ],
)
def test_a_snapshot_holds_exactly_the_cached_blocks(
    changes: list[tuple[str, list[int]]], cached: set[int], last_event_id: int
) -> None:
    log = KvEventLog()
    for kind, hashes in changes:
        log.record(kind, hashes)
    snapshot = log.snapshot()
    assert set(snapshot.block_hashes) == cached
    assert snapshot.last_event_id == last_event_id


async def test_subscribers_receive_events_recorded_on_another_thread_in_order() -> None:
    log = KvEventLog()
    stream = log.subscribe()
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # let the subscription register before recording
    thread = threading.Thread(target=lambda: [log.record("stored", [i]) for i in range(1, 51)])
    thread.start()
    received = [await first]
    while len(received) < 50:
        received.append(await anext(stream))
    thread.join()
    await stream.aclose()
    assert [event.event_id for event in received] == list(range(1, 51))


async def test_a_slow_subscriber_loses_events_and_the_index_resyncs_from_a_snapshot() -> None:
    log = KvEventLog(max_queued=2)
    stream = log.subscribe()
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    for block_hash in range(1, 6):
        log.record("stored", [block_hash])
    await asyncio.sleep(0)  # deliver: ids 1 and 2 queue (one is taken by the waiter), the rest drop
    index = KvIndex()
    index.add_worker("w")
    received = [await pending, await anext(stream)]
    log.record("removed", [1])  # id 6 arrives after the loss
    received.append(await anext(stream))
    await stream.aclose()
    outcomes = [index.apply("w", event) for event in received]
    assert log.num_dropped > 0
    assert ApplyOutcome.GAP in outcomes and index.needs_resync("w")
    assert index.apply_snapshot("w", log.snapshot()) is ApplyOutcome.APPLIED
    assert index.overlaps([2], ["w"]) == {"w": 1}
    assert index.overlaps([1], ["w"]) == {"w": 0}
    assert index.num_worker_blocks("w") == 4


def test_snapshot_type_is_plain_data() -> None:
    assert KvSnapshot(3, (1,)) == KvSnapshot(3, (1,))
