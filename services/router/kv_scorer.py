"""KV-aware cost: send a request where its prefix is cached unless that worker is busier than the saving.

cost(w) = overlap_weight x blocks_to_prefill(w) + queued_prefill_blocks(w) + decode_blocks(w): the
blocks this prompt would prefill on w (what a cache hit saves) weighted, plus w's load in blocks. The
lowest cost wins, or a softmax over normalised costs picks among near-equal workers with a temperature.

Unlike Dynamo's router, other requests' queued prefill is load (weight 1), not part of the weighted
term: weighted, a holder busy with one cold prefill looked as expensive as prefilling the whole
prompt elsewhere, and the miss then evicted another tenant there (benchmarks/prefix_routing.py: hit
rate 62% instead of ~76% of prompt tokens).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from services.router.kv_approx import ApproximateCache
from services.router.kv_index import KvIndex
from services.router.kv_load import LoadTracker
from tandem.kv.hashing import iter_block_hashes


@dataclass(slots=True, frozen=True)
class KvWeights:
    """The cost's knobs; set in configuration, overridable per request."""

    # How much a block this prompt must prefill weighs against a block of load (queued prefill or
    # held by a decoding request): the price of a cache miss beyond its own latency, since the
    # recomputation also evicts someone else's prefix. Higher keeps prefixes where they are
    # cached (TTFT, hit rate), lower spreads load sooner; a hot prefix spills to a cold worker
    # once its holder carries about overlap_weight x its length in extra load.
    overlap_weight: float = 4.0
    # 0: always the lowest cost. Above 0: softmax over costs scaled to [0, 1], so near-equal
    # workers share the traffic; around 1 makes even clearly worse workers a likely pick.
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.overlap_weight) and self.overlap_weight >= 0):
            raise ValueError(f"invalid router setting kv_overlap_weight: must be >= 0, got {self.overlap_weight}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"invalid router setting kv_temperature: must be >= 0, got {self.temperature}")

    def override(self, overlap_weight: float | None = None, temperature: float | None = None) -> KvWeights:
        """These weights with a request's overrides; raises ``ValueError`` naming a bad one."""
        if overlap_weight is None and temperature is None:
            return self
        return KvWeights(
            self.overlap_weight if overlap_weight is None else overlap_weight,
            self.temperature if temperature is None else temperature,
        )


class PromptBlocks:
    """One prompt's block hashes for one block size, computed as far as someone reads them, once."""

    __slots__ = ("block_size", "num_blocks", "num_tokens", "_hashes", "_pending")

    def __init__(self, token_ids: Sequence[int], block_size: int, known_hashes: Sequence[int] = ()) -> None:
        """``known_hashes``: all of the prompt's hashes when the caller already computed them."""
        self.block_size = block_size
        self.num_tokens = len(token_ids)
        self.num_blocks = self.num_tokens // block_size
        if known_hashes and len(known_hashes) == self.num_blocks:
            self._hashes: list[int] = list(known_hashes)
            self._pending: Iterator[int] = iter(())
        else:  # none, or not for this prompt: never trust a mismatched list
            self._hashes = []
            self._pending = iter_block_hashes(token_ids, block_size)

    def __iter__(self) -> Iterator[int]:
        yield from self._hashes
        for block_hash in self._pending:
            self._hashes.append(block_hash)
            yield block_hash

    def first(self, num_blocks: int) -> list[int]:
        """The first ``num_blocks`` hashes, computing only those not computed yet."""
        missing = num_blocks - len(self._hashes)
        if missing > 0:
            self._hashes.extend(itertools.islice(self._pending, missing))
        return self._hashes[:num_blocks]

    def all(self) -> list[int]:
        self._hashes.extend(self._pending)
        return self._hashes


@dataclass(slots=True, frozen=True)
class WorkerCost:
    worker_id: str
    num_cached_blocks: int  # leading prompt blocks the worker already holds
    prefill_blocks: float  # this prompt's part the worker would prefill (tokens / block size)
    queued_prefill_blocks: float  # prefill routed there that has not produced a first token yet
    decode_blocks: int  # blocks its active requests hold, plus those this request would add
    cost: float


@dataclass(slots=True)
class KvEvaluation:
    """The costs of one request, kept until the choice is recorded."""

    costs: list[WorkerCost]
    prompts: dict[int, PromptBlocks]  # by block size
    block_sizes: dict[str, int]  # by worker id

    def cost_of(self, worker_id: str) -> WorkerCost | None:
        return next((cost for cost in self.costs if cost.worker_id == worker_id), None)


def pick_lowest_cost(costs: Sequence[WorkerCost], temperature: float, rng: random.Random) -> WorkerCost:
    """Lowest cost, ties shared at random; with a temperature, softmax over min-max scaled costs.

    Scaling first makes the temperature mean the same thing at any load level, as in Dynamo's
    KV router: only the relative spread between candidates matters.
    """
    if not costs:
        raise ValueError("pick_lowest_cost needs at least one candidate")
    lowest = min(cost.cost for cost in costs)
    highest = max(cost.cost for cost in costs)
    spread = highest - lowest
    if temperature <= 0 or spread <= 0:
        tied = [cost for cost in costs if cost.cost <= lowest + 1e-9 * max(1.0, abs(lowest))]
        return tied[0] if len(tied) == 1 else rng.choice(tied)
    weights = [math.exp(-(cost.cost - lowest) / spread / temperature) for cost in costs]
    return rng.choices(list(costs), weights=weights)[0]


class KvRouter:
    """The KV-aware routing state of one router: prefix index, approximate caches, load tracking.

    ``evaluate`` prices each candidate; the caller picks (``pick_lowest_cost`` or a policy
    picker) and then calls ``record_routed`` so the load and approximate cache see the choice.
    """

    def __init__(self, index: KvIndex | None = None, tracker: LoadTracker | None = None,
                 approximate: ApproximateCache | None = None, weights: KvWeights | None = None,
                 rng: random.Random | None = None) -> None:
        self.index = index if index is not None else KvIndex()
        self.tracker = tracker if tracker is not None else LoadTracker()
        self.approximate = approximate if approximate is not None else ApproximateCache(self.index)
        self.weights = weights or KvWeights()
        self.rng = rng or random.Random()

    # -- workers -------------------------------------------------------------------------------

    def add_worker(self, worker_id: str, *, publishes_events: bool, capacity_blocks: int | None = None) -> None:
        """Track a worker; one that publishes no KV events gets an approximate cache instead."""
        if publishes_events:
            self.index.add_worker(worker_id)
        else:
            self.approximate.add_worker(worker_id, capacity_blocks)

    def remove_worker(self, worker_id: str) -> None:
        if worker_id in self.approximate:
            self.approximate.remove_worker(worker_id)
        else:
            self.index.remove_worker(worker_id)
        self.tracker.remove_worker(worker_id)

    # -- a decision ----------------------------------------------------------------------------

    def evaluate(self, token_ids: Sequence[int], candidates: Sequence[tuple[str, int]],
                 weights: KvWeights | None = None, *, block_hashes: Sequence[int] = (),
                 hashes_block_size: int = 0) -> KvEvaluation:
        """Cost of each ``(worker_id, block_size)`` candidate for a prompt of ``token_ids``.

        ``block_hashes`` (of ``hashes_block_size``-token blocks) saves hashing the prompt here.
        """
        weights = weights or self.weights
        self.tracker.expire()
        self.approximate.expire()
        by_size: dict[int, list[str]] = {}
        for worker_id, block_size in candidates:
            by_size.setdefault(block_size, []).append(worker_id)
        prompts: dict[int, PromptBlocks] = {}
        costs: list[WorkerCost] = []
        num_tokens = len(token_ids)
        tracker = self.tracker
        for block_size, worker_ids in by_size.items():
            known = block_hashes if block_size == hashes_block_size else ()
            prompt = prompts[block_size] = PromptBlocks(token_ids, block_size, known)
            overlaps = self.index.overlaps(prompt, worker_ids)
            request_blocks = -(-num_tokens // block_size)
            for worker_id in worker_ids:
                cached = overlaps[worker_id]
                prefill = (num_tokens - cached * block_size) / block_size
                queued = tracker.prefill_tokens(worker_id) / block_size
                # Blocks that running requests already hold (a shared system prompt) add nothing.
                shared = tracker.num_active_leading(worker_id, prompt.first(cached)) if cached else 0
                decode = tracker.decode_blocks(worker_id) + request_blocks - shared
                costs.append(WorkerCost(worker_id, cached, prefill, queued, decode,
                                        weights.overlap_weight * prefill + queued + decode))
        return KvEvaluation(costs, prompts, {worker_id: size for worker_id, size in candidates})

    def pick(self, evaluation: KvEvaluation, weights: KvWeights | None = None) -> WorkerCost:
        return pick_lowest_cost(evaluation.costs, (weights or self.weights).temperature, self.rng)

    def record_routed(self, request_id: str, worker_id: str, evaluation: KvEvaluation) -> None:
        """The request went to ``worker_id``: count its load there and predict its cache."""
        chosen = evaluation.cost_of(worker_id)
        block_size = evaluation.block_sizes.get(worker_id)
        if chosen is None or block_size is None:
            return
        prompt = evaluation.prompts[block_size]
        num_cached = chosen.num_cached_blocks
        # Only the cached prefix is counted by hash (shared with other requests on the worker);
        # the rest is the request's own. Hashing it too would double the cost of a cold 8k-token
        # decision, and concurrent requests sharing a still-uncached prefix merely look busier.
        shared = prompt.first(num_cached)
        num_private = -(-prompt.num_tokens // block_size) - num_cached + 1  # + the first output block
        prefill_tokens = prompt.num_tokens - num_cached * block_size
        self.tracker.on_routed(request_id, worker_id, prefill_tokens, shared, num_private)
        if worker_id in self.approximate:
            self.approximate.on_routed(worker_id, prompt.all())

    def on_first_token(self, request_id: str, worker_id: str | None = None) -> None:
        self.tracker.on_first_token(request_id, worker_id)

    def on_finished(self, request_id: str, worker_id: str | None = None) -> None:
        self.tracker.on_finished(request_id, worker_id)

    def on_load_report(self, worker_id: str, num_kv_blocks_used: int) -> None:
        self.tracker.on_load_report(worker_id, num_kv_blocks_used)
