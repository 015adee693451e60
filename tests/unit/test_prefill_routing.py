"""Conditional disaggregation in the router: when a prompt goes to a prefill worker, and to which."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry

from services.router.config import parse_args
from services.router.disagg import DisaggMetrics, DisaggSettings, PrefillSelector, QueueRoomFilter
from services.router.policy import NoWorkerAvailable, RouteContext
from services.router.registry import WorkerInfo, WorkerLoad, WorkerRole, WorkerSnapshot

pytestmark = pytest.mark.unit

DECODE = WorkerSnapshot(WorkerInfo("d0", WorkerRole.DECODE, "d0:1", "m", block_size=16), WorkerLoad(num_free_queue_slots=8))


def prefill_worker(worker_id: str, *, free: int = 8, running: int = 0, routed: int = 0, healthy: bool = True,
                   model: str = "m") -> WorkerSnapshot:
    return WorkerSnapshot(WorkerInfo(worker_id, WorkerRole.PREFILL, f"{worker_id}:1", model),
                          WorkerLoad(num_running=running, num_free_queue_slots=free),
                          num_routed_since_report=routed, healthy=healthy)


def context(num_tokens: int, model: str = "m", exclude: tuple[str, ...] = ()) -> RouteContext:
    return RouteContext("r", model=model, token_ids=list(range(num_tokens)), exclude_worker_ids=frozenset(exclude))


def selector(threshold: int = 100, enforce: bool = False, cached: int = 0) -> PrefillSelector:
    return PrefillSelector(DisaggSettings(threshold, enforce), DisaggMetrics(CollectorRegistry()),
                           cached_tokens=lambda ctx, worker: cached, rng=random.Random(0))


@pytest.mark.parametrize(("case", "num_tokens", "cached", "workers", "chosen"), [
    ("long prompt, a prefill worker", 100, 0, [prefill_worker("p0")], "p0"),
    ("short prompt", 99, 0, [prefill_worker("p0")], None),
    ("long but mostly cached on the decode worker", 400, 320, [prefill_worker("p0")], None),
    ("no prefill worker: aggregated", 500, 0, [], None),
    ("prefill workers without queue room", 500, 0, [prefill_worker("p0", free=0),
                                                    prefill_worker("p1", free=2, routed=2)], None),
    ("unhealthy prefill worker", 500, 0, [prefill_worker("p0", healthy=False)], None),
    ("other model", 500, 0, [prefill_worker("p0", model="other")], None),
    ("least loaded of two", 500, 0, [prefill_worker("p0", running=3), prefill_worker("p1", running=1)], "p1"),
])
def test_remote_prefill_when_the_uncached_prompt_is_long_and_a_prefill_worker_has_room(
        case: str, num_tokens: int, cached: int, workers: list[WorkerSnapshot], chosen: str | None) -> None:
    hint = selector(cached=cached).select(context(num_tokens), DECODE, [DECODE, *workers])
    assert (hint.worker_id if hint else None) == chosen, case
    if hint is not None:
        assert hint.address == f"{chosen}:1" and hint.min_remote_prefill_tokens == 100


def test_excluded_prefill_workers_are_skipped() -> None:
    hint = selector().select(context(500, exclude=("p0",)), DECODE, [DECODE, prefill_worker("p0"), prefill_worker("p1")])
    assert hint is not None and hint.worker_id == "p1"


def test_enforced_disaggregation_fails_naming_why() -> None:
    enforced = selector(enforce=True)
    with pytest.raises(NoWorkerAvailable, match=r"--enforce-disagg.*no healthy prefill worker is registered"):
        enforced.select(context(10), DECODE, [DECODE])  # none at all: even short prompts fail
    with pytest.raises(NoWorkerAvailable, match=r"--enforce-disagg.*queue-room"):
        enforced.select(context(500), DECODE, [DECODE, prefill_worker("p0", free=0)])
    # A short prompt with prefill workers present is still prefilled on the decode worker.
    assert enforced.select(context(10), DECODE, [DECODE, prefill_worker("p0")]) is None


def test_queue_room_counts_requests_sent_since_the_last_report() -> None:
    workers = [prefill_worker("a", free=2, routed=1), prefill_worker("b", free=2, routed=2)]
    assert [w.worker_id for w in QueueRoomFilter().filter(context(1), workers)] == ["a"]


def test_router_flags() -> None:
    config = parse_args(["--remote-prefill-threshold", "0", "--enforce-disagg"], {})
    assert config.disagg() == DisaggSettings(0, True)
    assert parse_args([], {"TANDEM_REMOTE_PREFILL_THRESHOLD": "2048"}).remote_prefill_threshold == 2048
    with pytest.raises(SystemExit):
        parse_args(["--remote-prefill-threshold", "-1"], {})


def test_prefill_workers_are_scored_by_the_prefix_they_already_hold() -> None:
    """Issue 4, disaggregated mode: a prefill worker holding the prompt's prefix (per its KV
    events in the router's index) wins over a less loaded one that would prefill it all."""
    from services.router.disagg import index_cached_tokens
    from services.router.kv_index import KvIndex
    from tandem.kv.hashing import hash_blocks

    prompt = list(range(1000, 1640))  # 40 blocks of 16
    index = KvIndex()
    for worker_id in ("p0", "p1"):
        index.add_worker(worker_id)
    index.store("p0", hash_blocks(prompt[:576], 16))  # p0 holds the first 36 blocks
    chooser = PrefillSelector(DisaggSettings(100), DisaggMetrics(CollectorRegistry()),
                              cached_tokens=index_cached_tokens(index), rng=random.Random(0))
    busy_with_cache = WorkerSnapshot(WorkerInfo("p0", WorkerRole.PREFILL, "p0:1", "m", block_size=16),
                                     WorkerLoad(num_running=3, num_free_queue_slots=8))
    idle_without = WorkerSnapshot(WorkerInfo("p1", WorkerRole.PREFILL, "p1:1", "m", block_size=16),
                                  WorkerLoad(num_running=0, num_free_queue_slots=8))
    request = RouteContext("r", model="m", token_ids=prompt)
    # the decode worker holds none of it, so the prompt qualifies for a remote prefill
    hint = chooser.select(request, DECODE, [DECODE, busy_with_cache, idle_without])
    assert hint is not None and hint.worker_id == "p0"
    other = RouteContext("r2", model="m", token_ids=list(range(5000, 5640)))  # nobody holds this one
    hint = chooser.select(other, DECODE, [DECODE, busy_with_cache, idle_without])
    assert hint is not None and hint.worker_id == "p1"
