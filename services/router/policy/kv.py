"""The kv policy's plugins: a scorer pricing each worker by KV cost, and a softmax picker.

The scorer maps cost(w) = overlap_weight x blocks_to_prefill(w) + decode_blocks(w) onto [0, 1]
(lowest cost 1, highest 0) so it fits the chain; the picker then samples with a temperature.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from services.router.kv_metrics import KvMetrics
from services.router.kv_scorer import KvEvaluation, KvRouter, KvWeights
from services.router.policy.base import RouteContext, ScoredWorker
from services.router.registry import WorkerSnapshot

DEFAULT_BLOCK_SIZE = 16  # for a worker that registered without one (the engines' default)


def request_weights(kv: KvRouter, context: RouteContext) -> KvWeights:
    """The configured weights with the request's overrides; ``ValueError`` names a bad one."""
    return kv.weights.override(context.kv_overlap_weight, context.kv_temperature)


class KvCostScorer:
    """Scores candidates by KV cost and, once one is chosen, tells the KV router (load, cache).

    Keeps the last evaluation between ``score`` and ``on_routed``: a decision runs both
    synchronously on the event loop, so no other request can come between them.
    """

    name = "kv-cost"

    def __init__(self, kv: KvRouter, metrics: KvMetrics | None = None) -> None:
        self._kv = kv
        self._metrics = metrics
        self._last: tuple[str, KvEvaluation] | None = None

    def score(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> dict[str, float]:
        candidates = [(worker.worker_id, worker.info.block_size or DEFAULT_BLOCK_SIZE) for worker in workers]
        evaluation = self._kv.evaluate(
            context.token_ids, candidates, request_weights(self._kv, context),
            block_hashes=context.block_hashes, hashes_block_size=context.block_size,
        )
        self._last = (context.request_id, evaluation)
        costs = {cost.worker_id: cost.cost for cost in evaluation.costs}
        lowest, highest = min(costs.values()), max(costs.values())
        if highest <= lowest:
            return dict.fromkeys(costs, 1.0)
        return {worker_id: (highest - cost) / (highest - lowest) for worker_id, cost in costs.items()}

    def on_routed(self, context: RouteContext, worker: WorkerSnapshot) -> None:
        if self._last is None or self._last[0] != context.request_id:
            return
        evaluation = self._last[1]
        self._last = None
        self._kv.record_routed(context.request_id, worker.worker_id, evaluation)
        chosen = evaluation.cost_of(worker.worker_id)
        prompt = evaluation.prompts.get(evaluation.block_sizes.get(worker.worker_id, 0))
        if self._metrics is None or chosen is None or prompt is None:
            return
        self._metrics.routed_requests.labels(worker_id=worker.worker_id).inc()
        self._metrics.routed_cached_blocks.labels(worker_id=worker.worker_id).inc(chosen.num_cached_blocks)
        if prompt.num_blocks:
            self._metrics.predicted_hit_rate.observe(chosen.num_cached_blocks / prompt.num_blocks)


class SoftmaxPicker:
    """Highest score at temperature 0 (ties at random); otherwise samples softmax(score / T).

    With the kv scorer alone, scores are 1 - min-max scaled costs, so this is the same choice as
    ``kv_scorer.pick_lowest_cost``. The request's ``kv_temperature`` overrides the configured one.
    """

    name = "softmax"

    def __init__(self, temperature: float = 0.0, rng: random.Random | None = None) -> None:
        self._temperature = temperature
        self._rng = rng or random.Random()

    def pick(self, context: RouteContext, candidates: Sequence[ScoredWorker]) -> ScoredWorker:
        temperature = self._temperature if context.kv_temperature is None else context.kv_temperature
        best = max(candidate.score for candidate in candidates)
        if temperature <= 0:
            tied = [candidate for candidate in candidates if candidate.score >= best - 1e-9]
            return tied[0] if len(tied) == 1 else self._rng.choice(tied)
        weights = [math.exp((candidate.score - best) / temperature) for candidate in candidates]
        return self._rng.choices(list(candidates), weights=weights)[0]
