"""Routing policy plugins and their pipeline: table-driven, no sockets."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from services.router.policy import (
    POLICIES,
    ExcludeFilter,
    LeastLoadedScorer,
    MaxScorePicker,
    ModelFilter,
    NoWorkerAvailable,
    RandomPicker,
    RoleFilter,
    RoundRobinPicker,
    RouteContext,
    RoutingPolicy,
    ScoredWorker,
    WeightedScorer,
    build_policy,
)
from services.router.registry import WorkerInfo, WorkerLoad, WorkerRole, WorkerSnapshot

pytestmark = pytest.mark.unit


def worker(
    worker_id: str,
    *,
    model: str = "m",
    role: WorkerRole = WorkerRole.DECODE,
    running: int = 0,
    waiting: int = 0,
    routed: int = 0,
    healthy: bool = True,
) -> WorkerSnapshot:
    return WorkerSnapshot(
        info=WorkerInfo(worker_id=worker_id, role=role, address=f"{worker_id}:1", model=model),
        load=WorkerLoad(num_running=running, num_waiting=waiting),
        num_routed_since_report=routed,
        healthy=healthy,
    )


def ctx(model: str = "", exclude: tuple[str, ...] = ()) -> RouteContext:
    return RouteContext(request_id="r", model=model, token_ids=[1, 2], exclude_worker_ids=frozenset(exclude))


def ids(workers: list[WorkerSnapshot]) -> list[str]:
    return [w.worker_id for w in workers]


@pytest.mark.parametrize(
    ("name", "plugin", "context", "workers", "kept"),
    [
        ("any model", ModelFilter(), ctx(), [worker("a", model="x"), worker("b", model="y")], ["a", "b"]),
        ("named model", ModelFilter(), ctx("y"), [worker("a", model="x"), worker("b", model="y")], ["b"]),
        ("unknown model", ModelFilter(), ctx("z"), [worker("a", model="x")], []),
        ("exclude one", ExcludeFilter(), ctx(exclude=("a",)), [worker("a"), worker("b")], ["b"]),
        ("exclude none", ExcludeFilter(), ctx(), [worker("a"), worker("b")], ["a", "b"]),
        ("decode only", RoleFilter(), ctx(), [worker("a", role=WorkerRole.PREFILL), worker("b")], ["b"]),
    ],
)
def test_filters(name: str, plugin: ModelFilter, context: RouteContext, workers: list[WorkerSnapshot],
                 kept: list[str]) -> None:
    assert ids(plugin.filter(context, workers)) == kept, name


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([worker("a"), worker("b")], {"a": 1.0, "b": 1.0}),
        ([worker("a", running=4), worker("b", running=2), worker("c")], {"a": 0.0, "b": 0.5, "c": 1.0}),
        # waiting requests and requests routed since the last report count as load too
        ([worker("a", waiting=3), worker("b", routed=3), worker("c", running=1)], {"a": 0.0, "b": 0.0, "c": 1.0}),
        ([worker("a", running=7)], {"a": 1.0}),
    ],
)
def test_least_loaded_scorer(workers: list[WorkerSnapshot], expected: dict[str, float]) -> None:
    assert LeastLoadedScorer().score(ctx(), workers) == pytest.approx(expected)


def scored(*pairs: tuple[str, float]) -> list[ScoredWorker]:
    return [ScoredWorker(worker(worker_id), score) for worker_id, score in pairs]


def test_max_score_picker_takes_the_best() -> None:
    picker = MaxScorePicker(random.Random(0))
    assert picker.pick(ctx(), scored(("a", 0.2), ("b", 0.9), ("c", 0.5))).worker.worker_id == "b"


def test_max_score_picker_breaks_ties_randomly() -> None:
    picker = MaxScorePicker(random.Random(0))
    picks = Counter(picker.pick(ctx(), scored(("a", 1.0), ("b", 1.0), ("c", 0.0))).worker.worker_id
                    for _ in range(200))
    assert set(picks) == {"a", "b"}
    assert min(picks.values()) > 60


def test_round_robin_cycles_by_worker_id_across_membership_changes() -> None:
    picker = RoundRobinPicker()
    three = scored(("c", 0), ("a", 0), ("b", 0))
    assert [picker.pick(ctx(), three).worker.worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    # "b" left: the next after "a" is "c", not a repeat of "a"
    assert picker.pick(ctx(), scored(("a", 0), ("c", 0))).worker.worker_id == "c"


def test_random_picker_uses_every_candidate() -> None:
    picker = RandomPicker(random.Random(1))
    picks = {picker.pick(ctx(), scored(("a", 0), ("b", 0), ("c", 0))).worker.worker_id for _ in range(50)}
    assert picks == {"a", "b", "c"}


@pytest.mark.parametrize(
    ("workers", "context", "message"),
    [
        ([], ctx("m"), "no healthy worker serves model 'm': no decode worker is registered"),
        ([worker("a", healthy=False)], ctx("m"), "none left after the 'healthy' filter"),
        ([worker("a", model="x")], ctx("m"), "no healthy worker serves model 'm' (1 registered, none left "
                                             "after the 'model' filter)"),
        ([worker("a")], ctx(exclude=("a",)), "none left after the 'exclude' filter"),
        ([worker("a", role=WorkerRole.PREFILL)], ctx(), "none left after the 'role' filter"),
    ],
)
def test_no_candidate_names_model_and_filter(workers: list[WorkerSnapshot], context: RouteContext,
                                             message: str) -> None:
    with pytest.raises(NoWorkerAvailable) as raised:
        build_policy("least-loaded").select(context, workers)
    assert message in raised.value.message


def test_health_is_filtered_before_every_policy() -> None:
    workers = [worker("sick", healthy=False), worker("well", running=50)]
    for name in POLICIES:
        policy = build_policy(name, random.Random(0))
        assert {policy.select(ctx(), workers).worker.worker_id for _ in range(20)} == {"well"}, name


def test_least_loaded_policy_prefers_idle_worker_of_the_right_model() -> None:
    workers = [worker("busy", running=3), worker("idle"), worker("other-model", model="x")]
    decision = build_policy("least-loaded", random.Random(0)).select(ctx("m"), workers)
    assert (decision.worker.worker_id, decision.score, decision.num_candidates) == ("idle", 1.0, 2)


class _FavouriteScorer:
    """A stand-in for a later scorer (e.g. KV-aware): likes one worker, out of range on purpose."""

    name = "favourite"

    def __init__(self, favourite: str) -> None:
        self.favourite = favourite

    def score(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> dict[str, float]:
        return {w.worker_id: 5.0 if w.worker_id == self.favourite else -1.0 for w in workers}


@pytest.mark.parametrize(
    ("favourite_weight", "chosen"),
    [(0.5, "idle"), (3.0, "busy")],
)
def test_weighted_scorers_combine(favourite_weight: float, chosen: str) -> None:
    policy = RoutingPolicy(
        "mix", [ModelFilter()],
        [WeightedScorer(LeastLoadedScorer(), 1.0), WeightedScorer(_FavouriteScorer("busy"), favourite_weight)],
        MaxScorePicker(random.Random(0)),
    )
    decision = policy.select(ctx(), [worker("busy", running=2), worker("idle")])
    assert decision.worker.worker_id == chosen
    assert 0.0 <= decision.score <= 1.0


def test_bad_policy_name_and_weight_are_named() -> None:
    with pytest.raises(ValueError, match="policy: 'fastest'"):
        build_policy("fastest")
    with pytest.raises(ValueError, match="weight for least-loaded"):
        WeightedScorer(LeastLoadedScorer(), 0.0)


def test_only_candidate_counts_every_registered_worker_of_the_model_healthy_or_not() -> None:
    from services.router.servicer import RouterServicer
    from services.router.servicer import _only_candidate as only_candidate_of
    from tandem.proto.router.v1 import router_pb2

    def _only_candidate(request: router_pb2.RouteRequest, chosen: WorkerSnapshot,
                        workers: list[WorkerSnapshot]) -> bool:
        context = RouterServicer._route_context(request, request.request_id)
        return only_candidate_of(request, context, chosen, workers)

    def worker(worker_id: str, role: WorkerRole = WorkerRole.DECODE, model: str = "m",
               healthy: bool = True) -> WorkerSnapshot:
        return WorkerSnapshot(WorkerInfo(worker_id, role, f"{worker_id}:1", model), healthy=healthy)

    request = router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1])
    alone, other_model = worker("a"), worker("x", model="m2")
    assert _only_candidate(request, alone, [alone, other_model])
    # A quarantined rival is routed around now, but may take the next request: no prediction.
    assert not _only_candidate(request, alone, [alone, worker("b", healthy=False)])
    assert not _only_candidate(request, alone, [alone, worker("p", WorkerRole.PREFILL, healthy=False)])
    excluding = router_pb2.RouteRequest(request_id="r", model="m", token_ids=[1], exclude_worker_ids=["z"])
    assert not _only_candidate(excluding, alone, [alone])
    any_model = router_pb2.RouteRequest(request_id="r", token_ids=[1])  # no model: every worker may serve it
    assert not _only_candidate(any_model, alone, [alone, other_model])
