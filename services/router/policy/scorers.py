"""Scorers: rate candidates in [0, 1], higher is better."""

from __future__ import annotations

from collections.abc import Sequence

from services.router.policy.base import RouteContext
from services.router.registry import WorkerSnapshot


def effective_load(worker: WorkerSnapshot) -> int:
    """Requests on the worker: its last report plus what was routed there since."""
    return worker.load.num_running + worker.load.num_waiting + worker.num_routed_since_report


class LeastLoadedScorer:
    """Min-max normalised load: the least loaded candidate scores 1, the most loaded 0.

    Relative rather than absolute (e.g. 1/(1+load)) so the scale does not shrink as the whole
    fleet gets busier, which keeps its weight meaningful next to other scorers.
    """

    name = "least-loaded"

    def score(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> dict[str, float]:
        loads = {worker.worker_id: effective_load(worker) for worker in workers}
        lowest, highest = min(loads.values()), max(loads.values())
        if highest == lowest:
            return dict.fromkeys(loads, 1.0)
        return {worker_id: (highest - load) / (highest - lowest) for worker_id, load in loads.items()}
