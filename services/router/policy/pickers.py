"""Pickers: choose one worker among the scored candidates."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.policy.base import RouteContext, ScoredWorker

# Scores are means of floats; treat near-equal ones as ties so they are shared fairly.
_TIE_TOLERANCE = 1e-9


class MaxScorePicker:
    """Highest score wins; ties are broken at random so equal workers share the traffic."""

    name = "max-score"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, context: RouteContext, candidates: Sequence[ScoredWorker]) -> ScoredWorker:
        best = max(candidate.score for candidate in candidates)
        tied = [candidate for candidate in candidates if candidate.score >= best - _TIE_TOLERANCE]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RandomPicker:
    """Uniformly random, ignoring scores."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, context: RouteContext, candidates: Sequence[ScoredWorker]) -> ScoredWorker:
        return self._rng.choice(list(candidates))


class RoundRobinPicker:
    """Cycles through candidates in worker-id order, ignoring scores.

    Remembers the last worker id rather than an index, so workers joining or leaving do
    not make it skip or repeat the others.
    """

    name = "round-robin"

    def __init__(self) -> None:
        self._last_worker_id: str | None = None

    def pick(self, context: RouteContext, candidates: Sequence[ScoredWorker]) -> ScoredWorker:
        ordered = sorted(candidates, key=lambda candidate: candidate.worker.worker_id)
        chosen = ordered[0]
        if self._last_worker_id is not None:
            chosen = next((c for c in ordered if c.worker.worker_id > self._last_worker_id), ordered[0])
        self._last_worker_id = chosen.worker.worker_id
        return chosen
