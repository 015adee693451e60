"""Routing as three small plugin kinds (after llm-d): filters narrow, scorers rate, a picker chooses.

Health is filtered once by the pipeline before any policy plugin runs (after SGLang's router), so
no policy can forget it. A KV-aware scorer is one more ``Scorer`` with a weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from services.router.registry import WorkerRole, WorkerSnapshot
from tandem.errors import Unavailable


@dataclass(slots=True, frozen=True)
class RouteContext:
    """The request being routed, as far as routing cares."""

    request_id: str
    model: str = ""  # empty: any model
    token_ids: Sequence[int] = ()
    exclude_worker_ids: frozenset[str] = frozenset()
    role: WorkerRole = WorkerRole.DECODE
    # The caller's hashes of token_ids' full blocks of block_size tokens (empty: not sent).
    block_hashes: Sequence[int] = ()
    block_size: int = 0
    # Per-request overrides of the kv policy's configured weights (None: keep them).
    kv_overlap_weight: float | None = None
    kv_temperature: float | None = None


@dataclass(slots=True, frozen=True)
class ScoredWorker:
    worker: WorkerSnapshot
    score: float  # weighted mean of the scorers' scores, in [0, 1]


@dataclass(slots=True, frozen=True)
class RouteDecision:
    worker: WorkerSnapshot
    score: float
    num_candidates: int


class Filter(Protocol):
    """Drops workers that cannot serve the request. Pure: no state, no I/O."""

    name: str

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        """Return the workers that may serve ``context``, in their given order."""
        ...


class Scorer(Protocol):
    """Rates the candidates that passed every filter; higher is better."""

    name: str

    def score(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> dict[str, float]:
        """Return a score in [0, 1] for every worker id in ``workers`` (never an empty input)."""
        ...


@runtime_checkable
class RoutingFeedback(Protocol):
    """Optional on a scorer: told which worker was chosen, before ``select`` returns."""

    def on_routed(self, context: RouteContext, worker: WorkerSnapshot) -> None:
        """Record the decision (predicted load, predicted cache). Must not block."""


class Picker(Protocol):
    """Chooses one worker among the scored candidates. May keep state (round-robin's position)."""

    name: str

    def pick(self, context: RouteContext, candidates: Sequence[ScoredWorker]) -> ScoredWorker:
        """Called with at least one candidate."""
        ...


@dataclass(slots=True, frozen=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"invalid scorer weight for {self.scorer.name}: must be > 0, got {self.weight}")


class NoWorkerAvailable(Unavailable):
    """No worker is left after filtering; maps onto gRPC UNAVAILABLE."""


class HealthyFilter:
    """Keeps workers the registry considers healthy. Always the first step of every policy."""

    name = "healthy"

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        return [worker for worker in workers if worker.healthy]


@dataclass(slots=True)
class RoutingPolicy:
    """Health, then ``filters`` in order, then weighted ``scorers``, then the ``picker``."""

    name: str
    filters: Sequence[Filter]
    scorers: Sequence[WeightedScorer]
    picker: Picker
    _health: Filter = field(default_factory=HealthyFilter)
    # Found once: an isinstance check against a runtime Protocol costs ~10 us, on every decision.
    _feedback: tuple[RoutingFeedback, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self._feedback = tuple(weighted.scorer for weighted in self.scorers
                               if isinstance(weighted.scorer, RoutingFeedback))

    def select(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> RouteDecision:
        """Choose a worker for ``context`` or raise ``NoWorkerAvailable`` saying which filter emptied the set."""
        candidates = list(workers)
        for step in (self._health, *self.filters):
            candidates = step.filter(context, candidates)
            if not candidates:
                raise NoWorkerAvailable(_unavailable_message(context, len(workers), step.name))
        scored = self._score(context, candidates)
        chosen = self.picker.pick(context, scored)
        for scorer in self._feedback:
            scorer.on_routed(context, chosen.worker)
        return RouteDecision(worker=chosen.worker, score=chosen.score, num_candidates=len(candidates))

    def _score(self, context: RouteContext, candidates: list[WorkerSnapshot]) -> list[ScoredWorker]:
        if not self.scorers:
            return [ScoredWorker(worker, 0.0) for worker in candidates]
        total = {worker.worker_id: 0.0 for worker in candidates}
        total_weight = sum(weighted.weight for weighted in self.scorers)
        for weighted in self.scorers:
            scores = weighted.scorer.score(context, candidates)
            for worker_id in total:
                # Clamp: one misbehaving scorer must not outweigh the others.
                total[worker_id] += weighted.weight * min(1.0, max(0.0, scores.get(worker_id, 0.0)))
        return [ScoredWorker(worker, total[worker.worker_id] / total_weight) for worker in candidates]


def _unavailable_message(context: RouteContext, num_registered: int, emptied_by: str) -> str:
    wanted = f"no healthy worker serves model {context.model!r}" if context.model else "no healthy worker"
    if num_registered == 0:
        return f"{wanted}: no {context.role.value} worker is registered with the router"
    return f"{wanted} ({num_registered} registered, none left after the {emptied_by!r} filter)"
