"""Conditional disaggregation: whether a request's prompt is prefilled on a prefill worker, and on which.

Remote prefill pays when the *effective* prompt (the prompt minus what the chosen decode worker
already caches) is long enough to stall that worker's running streams, and a prefill worker
has queue room. Otherwise the decode worker prefills locally. The decode worker re-checks the
effective length against its own prefix cache, which the router may only know approximately.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from services.router.kv_index import KvIndex
from services.router.kv_scorer import PromptBlocks
from services.router.policy import (
    ExcludeFilter,
    MaxScorePicker,
    ModelFilter,
    NoWorkerAvailable,
    RoleFilter,
    RouteContext,
    RoutingPolicy,
    WeightedScorer,
)
from services.router.policy.scorers import LeastLoadedScorer
from services.router.registry import WorkerRole, WorkerSnapshot
from tandem.proto.worker.v1 import worker_pb2

DECISIONS = ("remote", "local_short_prompt", "local_no_prefill_worker")
# (context, decode worker) -> prompt tokens that worker is believed to cache already.
CachedTokens = Callable[[RouteContext, WorkerSnapshot], int]
# A full prefix hit outweighs a load difference of the whole range (both scores are in [0, 1]).
PREFIX_WEIGHT = 2.0


@dataclass(slots=True, frozen=True)
class DisaggSettings:
    remote_prefill_threshold: int = 512  # effective prompt tokens from which prefill goes remote
    enforce_disagg: bool = False  # no prefill worker for a qualifying request: UNAVAILABLE, not local

    def __post_init__(self) -> None:
        if self.remote_prefill_threshold < 0:
            raise ValueError("invalid router setting remote_prefill_threshold: must be >= 0, got "
                             f"{self.remote_prefill_threshold}")


def index_cached_tokens(index: KvIndex) -> CachedTokens:
    """Cached prompt tokens per the KV index (workers that publish KV events; 0 for the others)."""

    def cached_tokens(context: RouteContext, worker: WorkerSnapshot) -> int:
        block_size = worker.info.block_size
        if not block_size:
            return 0
        known = context.block_hashes if context.block_size == block_size else ()
        blocks = PromptBlocks(context.token_ids, block_size, known)
        return index.overlaps(blocks, [worker.worker_id]).get(worker.worker_id, 0) * block_size

    return cached_tokens


class CachedPrefixScorer:
    """Scores prefill workers by the prompt prefix they already hold: most cached tokens 1, fewest 0.

    A prefill worker with the tenant's system prompt in its pool computes only the rest, so
    among prefill workers with room the one holding the longest prefix usually finishes first.
    """

    name = "cached-prefix"

    def __init__(self, cached_tokens: CachedTokens) -> None:
        self._cached_tokens = cached_tokens

    def score(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> dict[str, float]:
        cached = {worker.worker_id: self._cached_tokens(context, worker) for worker in workers}
        highest = max(cached.values(), default=0)
        if highest == 0:
            return dict.fromkeys(cached, 1.0)
        return {worker_id: tokens / highest for worker_id, tokens in cached.items()}


class QueueRoomFilter:
    """Keeps prefill workers that can still queue a request (their last report, minus what was sent since)."""

    name = "queue-room"

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        return [worker for worker in workers
                if worker.load.num_free_queue_slots > worker.num_routed_since_report]


class DisaggMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter("tandem_router_prefill_decisions", "Where the router sent prompts to be "
                                 "prefilled.", ["decision"], registry=registry)
        for decision in DECISIONS:
            self.decisions.labels(decision=decision)


class PrefillSelector:
    """Picks the prefill worker of a request, or None for a local prefill on the decode worker."""

    def __init__(self, settings: DisaggSettings, metrics: DisaggMetrics, *, cached_tokens: CachedTokens | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._metrics = metrics
        self._cached_tokens = cached_tokens
        scorers = [WeightedScorer(LeastLoadedScorer(), 1.0)]
        if cached_tokens is not None:  # prefill workers publish KV events too: prefer their cached prefix
            scorers.append(WeightedScorer(CachedPrefixScorer(cached_tokens), PREFIX_WEIGHT))
        self._policy = RoutingPolicy(
            "prefill-kv" if cached_tokens is not None else "prefill-least-loaded",
            [RoleFilter(), ModelFilter(), ExcludeFilter(), QueueRoomFilter()], scorers, MaxScorePicker(rng))

    def select(self, context: RouteContext, decode_worker: WorkerSnapshot,
               workers: Sequence[WorkerSnapshot]) -> worker_pb2.PrefillHint | None:
        """The hint for the decode worker, or None. Raises ``NoWorkerAvailable`` under ``enforce_disagg``
        when no prefill worker can take a request that qualifies (or none is registered at all)."""
        threshold = self.settings.remote_prefill_threshold
        prefill_context = dataclasses.replace(context, role=WorkerRole.PREFILL)
        cached = self._cached_tokens(context, decode_worker) if self._cached_tokens is not None else 0
        if len(context.token_ids) - cached < threshold:
            if self.settings.enforce_disagg and not any(w.info.role is WorkerRole.PREFILL and w.healthy
                                                        for w in workers):
                raise NoWorkerAvailable("remote prefill is enforced (--enforce-disagg) but no healthy prefill "
                                        "worker is registered with the router")
            self._metrics.decisions.labels(decision="local_short_prompt").inc()
            return None
        try:
            decision = self._policy.select(prefill_context, workers)
        except NoWorkerAvailable as error:
            if self.settings.enforce_disagg:
                raise NoWorkerAvailable(f"remote prefill is enforced (--enforce-disagg) but {error.message}") from None
            self._metrics.decisions.labels(decision="local_no_prefill_worker").inc()
            return None
        self._metrics.decisions.labels(decision="remote").inc()
        return worker_pb2.PrefillHint(worker_id=decision.worker.worker_id, address=decision.worker.info.address,
                                      min_remote_prefill_tokens=threshold)
