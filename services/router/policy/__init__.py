"""Routing policies: filters, scorers and a picker, assembled by name."""

from __future__ import annotations

import random

from services.router.kv_metrics import KvMetrics
from services.router.kv_scorer import KvRouter
from services.router.policy.base import (
    Filter,
    HealthyFilter,
    NoWorkerAvailable,
    Picker,
    RouteContext,
    RouteDecision,
    RoutingPolicy,
    ScoredWorker,
    Scorer,
    WeightedScorer,
)
from services.router.policy.filters import ExcludeFilter, ModelFilter, RoleFilter
from services.router.policy.kv import KvCostScorer, SoftmaxPicker
from services.router.policy.pickers import MaxScorePicker, RandomPicker, RoundRobinPicker
from services.router.policy.scorers import LeastLoadedScorer

POLICIES = ("least-loaded", "round-robin", "random", "kv")

__all__ = [
    "POLICIES", "ExcludeFilter", "Filter", "HealthyFilter", "KvCostScorer", "LeastLoadedScorer", "MaxScorePicker",
    "ModelFilter", "NoWorkerAvailable", "Picker", "RandomPicker", "RoleFilter", "RoundRobinPicker",
    "RouteContext", "RouteDecision", "RoutingPolicy", "ScoredWorker", "Scorer", "SoftmaxPicker", "WeightedScorer",
    "build_policy",
]


def build_policy(name: str, rng: random.Random | None = None, *, kv: KvRouter | None = None,
                 kv_metrics: KvMetrics | None = None) -> RoutingPolicy:
    """The policy called ``name`` (one of ``POLICIES``); ``rng`` makes random choices repeatable.

    ``kv`` policy: ``kv`` is the router's KV state (prefix index, load), fed by the workers' streams.
    """
    filters: list[Filter] = [RoleFilter(), ModelFilter(), ExcludeFilter()]
    if name == "kv":
        kv = kv if kv is not None else KvRouter(rng=rng)
        return RoutingPolicy(name, filters, [WeightedScorer(KvCostScorer(kv, kv_metrics), 1.0)],
                             SoftmaxPicker(kv.weights.temperature, rng))
    if name == "least-loaded":
        return RoutingPolicy(name, filters, [WeightedScorer(LeastLoadedScorer(), 1.0)], MaxScorePicker(rng))
    if name == "round-robin":
        return RoutingPolicy(name, filters, [], RoundRobinPicker())
    if name == "random":
        return RoutingPolicy(name, filters, [], RandomPicker(rng))
    raise ValueError(f"invalid router setting policy: {name!r} is not one of {', '.join(POLICIES)}")
