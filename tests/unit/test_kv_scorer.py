"""The KV cost: cache hits against load, softmax sharing, overrides, load tracking, approximate mode."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.router.kv_approx import ApproximateCache
from services.router.kv_index import KvIndex
from services.router.kv_load import LoadTracker
from services.router.kv_scorer import KvRouter, KvWeights, WorkerCost, pick_lowest_cost
from tandem.kv.hashing import hash_blocks

pytestmark = pytest.mark.unit

BS = 16
SYSTEM = list(range(1000, 1000 + 64 * BS))  # a 64-block shared prefix


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _router(workers: dict[str, bool], clock: FakeClock | None = None, *, share_blocks: bool = True,
            **weights: float) -> KvRouter:
    clock = clock or FakeClock()
    index = KvIndex()
    router = KvRouter(index, LoadTracker(clock=clock, share_blocks=share_blocks),
                      ApproximateCache(index, ttl_s=60, clock=clock), KvWeights(**weights), random.Random(0))
    for worker_id, publishes in workers.items():
        router.add_worker(worker_id, publishes_events=publishes)
    return router


def _route(router: KvRouter, request_id: str, tokens: list[int], workers: list[str],
           weights: KvWeights | None = None) -> WorkerCost:
    evaluation = router.evaluate(tokens, [(worker_id, BS) for worker_id in workers], weights)
    chosen = router.pick(evaluation, weights)
    router.record_routed(request_id, chosen.worker_id, evaluation)
    return chosen


def _question(i: int) -> list[int]:
    return SYSTEM + [5 + i % 7] * (BS + 3)


@pytest.mark.parametrize(
    ("cached", "prefill_tokens", "decode_blocks", "overlap_weight", "winner"),
    [
        ({"a": 64, "b": 0}, {}, {}, 1.0, "a"),  # the cached prefix wins when idle
        ({"a": 64, "b": 0}, {"a": 80 * BS}, {}, 1.0, "b"),  # unless a's prefill queue costs more
        ({"a": 64, "b": 0}, {}, {"a": 70}, 1.0, "b"),  # or its decode load does
        ({"a": 64, "b": 0}, {}, {"a": 70}, 2.0, "a"),  # a heavier overlap weight keeps the hit
        ({"a": 64, "b": 0}, {}, {"a": 10}, 0.0, "b"),  # weight 0: pure decode load
        ({"a": 32, "b": 64}, {}, {}, 1.0, "b"),  # the longer prefix
    ],
)
def test_lowest_cost_trades_cache_hits_against_load(
    cached: dict[str, int], prefill_tokens: dict[str, int], decode_blocks: dict[str, int],
    overlap_weight: float, winner: str,
) -> None:
    router = _router({"a": True, "b": True}, overlap_weight=overlap_weight)
    prompt = _question(0)
    hashes = hash_blocks(prompt, BS)
    for worker_id, num_blocks in cached.items():
        router.index.store(worker_id, hashes[:num_blocks])
    for worker_id, tokens in prefill_tokens.items():
        router.tracker.on_routed(f"busy-{worker_id}", worker_id, tokens, [], 0)
    for worker_id, blocks in decode_blocks.items():
        router.tracker.on_routed(f"long-{worker_id}", worker_id, 0, range(10**6, 10**6 + blocks), 0)
    assert router.pick(router.evaluate(prompt, [("a", BS), ("b", BS)])).worker_id == winner


def test_the_cost_is_weighted_blocks_to_prefill_plus_queued_prefill_plus_decode_blocks() -> None:
    router = _router({"a": True}, overlap_weight=2.0)
    prompt = SYSTEM[: 10 * BS] + [1] * 5  # 10 full blocks and a partial one
    router.index.store("a", hash_blocks(prompt, BS)[:4])
    router.tracker.on_routed("other", "a", 3 * BS, [7, 8], 1)
    (cost,) = router.evaluate(prompt, [("a", BS)]).costs
    assert cost.num_cached_blocks == 4
    assert cost.prefill_blocks == (len(prompt) - 4 * BS) / BS
    assert cost.queued_prefill_blocks == 3  # the other request has not produced a token yet
    assert cost.decode_blocks == 3 + 11  # the other request's blocks + this prompt's
    assert cost.cost == 2.0 * cost.prefill_blocks + cost.queued_prefill_blocks + cost.decode_blocks


def test_ties_are_shared_and_temperature_spreads_near_equal_workers() -> None:
    rng = random.Random(1)
    tied = [WorkerCost("a", 0, 1, 0, 1, 10.0), WorkerCost("b", 0, 1, 0, 1, 10.0)]
    assert set(Counter(pick_lowest_cost(tied, 0.0, rng).worker_id for _ in range(200))) == {"a", "b"}
    near = [WorkerCost("a", 0, 1, 0, 1, 10.0), WorkerCost("b", 0, 1, 0, 1, 11.0)]
    assert {pick_lowest_cost(near, 0.0, rng).worker_id for _ in range(50)} == {"a"}
    picks = Counter(pick_lowest_cost(near, 1.0, rng).worker_id for _ in range(2000))
    assert 0.6 < picks["a"] / 2000 < 0.85  # e^0 : e^-1 is 0.73 : 0.27
    assert picks["b"] > 0
    cold = Counter(pick_lowest_cost(near, 0.05, rng).worker_id for _ in range(500))
    assert cold["a"] > 490


@pytest.mark.parametrize(
    ("overlap_weight", "temperature", "expected"),
    [(None, None, KvWeights(4.0, 0.0)), (3.0, None, KvWeights(3.0, 0.0)), (None, 0.5, KvWeights(4.0, 0.5))],
)
def test_a_request_overrides_only_the_weights_it_sets(
    overlap_weight: float | None, temperature: float | None, expected: KvWeights
) -> None:
    assert KvWeights().override(overlap_weight, temperature) == expected


@pytest.mark.parametrize(("overlap_weight", "temperature"), [(-1.0, None), (None, -0.1), (float("nan"), None)])
def test_bad_overrides_are_refused_with_the_setting_named(overlap_weight: float | None,
                                                          temperature: float | None) -> None:
    with pytest.raises(ValueError, match="kv_overlap_weight|kv_temperature"):
        KvWeights().override(overlap_weight, temperature)


@pytest.mark.parametrize(("share_blocks", "both_blocks"), [(False, 4 + 4), (True, 4 + 2)])
def test_load_is_predicted_at_routing_moved_at_first_token_released_at_finish(share_blocks: bool,
                                                                              both_blocks: int) -> None:
    tracker = LoadTracker(clock=FakeClock(), share_blocks=share_blocks)
    tracker.on_routed("r1", "w", prefill_tokens=100, block_hashes=[1, 2, 3], num_private_blocks=1)
    tracker.on_routed("r2", "w", prefill_tokens=40, block_hashes=[1, 2, 9], num_private_blocks=1)
    assert (tracker.prefill_tokens("w"), tracker.decode_blocks("w")) == (140, both_blocks)  # 1, 2 shared
    tracker.on_first_token("r1")
    tracker.on_first_token("r1")  # repeated feedback is harmless
    assert (tracker.prefill_tokens("w"), tracker.decode_blocks("w")) == (40, both_blocks)
    tracker.on_finished("r1")
    assert (tracker.prefill_tokens("w"), tracker.decode_blocks("w")) == (40, 3 + 1)
    tracker.on_finished("r2")
    tracker.on_finished("never-routed")
    assert (tracker.prefill_tokens("w"), tracker.decode_blocks("w"), len(tracker)) == (0, 0, 0)


def test_a_rerouted_request_moves_its_load() -> None:
    tracker = LoadTracker(clock=FakeClock())
    tracker.on_routed("r", "a", 64, [1, 2], 1)
    tracker.on_routed("r", "b", 64, [1, 2], 1)
    assert tracker.decode_blocks("a") == 0 and tracker.prefill_tokens("a") == 0
    assert tracker.decode_blocks("b") == 3 and tracker.prefill_tokens("b") == 64


def test_notices_from_a_request_s_earlier_worker_do_not_release_its_new_load() -> None:
    tracker = LoadTracker(clock=FakeClock())
    tracker.on_routed("r", "a", 64, [1, 2], 1)
    tracker.on_routed("r", "b", 64, [1, 2], 1)  # migrated: the frontend routed it again
    tracker.on_first_token("r", "a")
    tracker.on_finished("r", "a")  # the first attempt ends on a, after the re-route
    assert tracker.prefill_tokens("b") == 64 and tracker.decode_blocks("b") == 3
    tracker.on_first_token("r", "b")
    tracker.on_finished("r", "b")
    assert len(tracker) == 0 and tracker.decode_blocks("b") == 0


def test_load_reports_add_blocks_the_router_did_not_predict_but_never_hide_predicted_ones() -> None:
    tracker = LoadTracker(clock=FakeClock())
    tracker.on_routed("r", "w", 0, [1, 2], 1)
    tracker.on_load_report("w", num_kv_blocks_used=50)  # another router's requests
    assert tracker.decode_blocks("w") == 50
    tracker.on_load_report("w", num_kv_blocks_used=0)  # the worker has not admitted r yet
    assert tracker.decode_blocks("w") == 3


def test_lost_feedback_expires() -> None:
    clock = FakeClock()
    tracker = LoadTracker(prefill_timeout_s=10, request_ttl_s=100, clock=clock)
    tracker.on_routed("r", "w", 64, [1], 1)
    clock.now = 11
    assert tracker.expire() == 0
    assert (tracker.prefill_tokens("w"), tracker.decode_blocks("w")) == (0, 2)
    clock.now = 101
    assert tracker.expire() == 1
    assert tracker.decode_blocks("w") == 0


@pytest.mark.parametrize(("share_blocks", "num_stay"), [(False, 4), (True, 40)])
def test_a_hot_prefix_stays_on_its_worker_until_that_worker_is_busy_then_spreads(share_blocks: bool,
                                                                                 num_stay: int) -> None:
    router = _router({"a": True, "b": True}, share_blocks=share_blocks)
    router.index.store("a", hash_blocks(SYSTEM, BS))
    chosen = [_route(router, f"r{i}", _question(i), ["a", "b"]).worker_id for i in range(70)]
    # Counting shared blocks once, a's running requests make more of them look cheap.
    assert chosen[:num_stay] == ["a"] * num_stay
    assert "b" in chosen  # until a's queued prefill and blocks outweigh prefilling on b
    for i in range(70):
        router.on_first_token(f"r{i}")
        router.on_finished(f"r{i}")
    assert _route(router, "later", _question(99), ["a", "b"]).worker_id == "a"


def test_without_load_the_same_prefix_always_returns_to_its_worker() -> None:
    router = _router({"a": True, "b": True, "c": True})
    router.index.store("b", hash_blocks(SYSTEM, BS))
    for i in range(20):
        assert _route(router, f"r{i}", _question(i), ["a", "b", "c"]).worker_id == "b"
        router.on_finished(f"r{i}")


def test_approximate_mode_predicts_the_cache_from_routing_and_forgets_after_the_ttl() -> None:
    clock = FakeClock()
    router = _router({"x": False, "y": False}, clock)
    first = _route(router, "r1", _question(1), ["x", "y"])
    router.on_finished("r1")
    assert first.num_cached_blocks == 0
    second = _route(router, "r2", _question(2), ["x", "y"])
    assert second.worker_id == first.worker_id and second.num_cached_blocks == 64
    router.on_finished("r2")
    clock.now = 61
    third = router.evaluate(_question(3), [("x", BS), ("y", BS)])
    assert {cost.num_cached_blocks for cost in third.costs} == {0}


def test_approximate_mode_keeps_at_most_the_pool_size_most_recent_first() -> None:
    index = KvIndex()
    cache = ApproximateCache(index, ttl_s=60, clock=FakeClock())
    cache.add_worker("x", capacity_blocks=3)
    cache.on_routed("x", [1, 2])
    cache.on_routed("x", [1, 5])  # 1 refreshed, so 2 is the stalest
    cache.on_routed("x", [6])
    assert index.num_worker_blocks("x") == 3
    assert index.overlaps([2]) == {"x": 0} and index.overlaps([1]) == {"x": 1}


def test_exact_and_approximate_workers_are_compared_on_one_scale() -> None:
    router = _router({"exact": True, "approx": False})
    router.index.store("exact", hash_blocks(SYSTEM, BS)[:10])
    router.approximate.on_routed("approx", hash_blocks(SYSTEM, BS))
    costs = {c.worker_id: c.num_cached_blocks for c in router.evaluate(_question(0), [("exact", BS),
                                                                                      ("approx", BS)]).costs}
    assert costs == {"exact": 10, "approx": 64}


def test_a_removed_worker_leaves_no_blocks_or_load_behind() -> None:
    router = _router({"a": True, "b": False})
    router.index.store("a", [1, 2])
    _route(router, "r1", _question(1), ["a"])
    _route(router, "r2", _question(1), ["b"])
    router.remove_worker("a")
    router.remove_worker("b")
    assert router.index.num_blocks == 0
    assert router.tracker.decode_blocks("a") == 0 and len(router.tracker) == 0


def test_workers_with_different_block_sizes_are_each_hashed_their_own_way() -> None:
    router = _router({"small": True, "big": True})
    router.index.store("big", hash_blocks(SYSTEM, 2 * BS))
    evaluation = router.evaluate(SYSTEM, [("small", BS), ("big", 2 * BS)])
    costs = {c.worker_id: c for c in evaluation.costs}
    assert costs["big"].num_cached_blocks == 32 and costs["small"].num_cached_blocks == 0
    assert router.pick(evaluation).worker_id == "big"


def test_with_shared_blocks_what_running_requests_hold_is_not_counted_again() -> None:
    router = _router({"a": True}, share_blocks=True)
    hashes = hash_blocks(SYSTEM, BS)
    router.index.store("a", hashes)
    router.tracker.on_routed("running", "a", 0, hashes, 2)  # holds the whole system prompt
    (cost,) = router.evaluate(_question(1), [("a", BS)]).costs
    assert cost.decode_blocks == (64 + 2) + (66 - 64)  # active + only this request's own blocks
    tracker = LoadTracker(clock=FakeClock(), share_blocks=True)
    tracker.on_routed("r", "w", 0, hashes[:10], 1)
    assert [tracker.num_active_leading("w", hashes[:n]) for n in (0, 5, 10, 64)] == [0, 5, 10, 10]
    assert tracker.num_active_leading("idle", hashes) == 0
