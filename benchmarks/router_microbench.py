"""Router microbenchmark: KV events applied per second and the KV routing decision time.

Decision = (hash the prompt unless the frontend sent its block hashes), walk the prefix index, price
every worker, pick, record the choice (load tracking), for an 8,000-token prompt taken from a
RouteRequest as the router receives it, with 1,000,000 blocks indexed.
Usage: python -m benchmarks.router_microbench [--help]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence

from services.router.kv_index import KvIndex
from services.router.kv_scorer import KvRouter
from tandem.kv.events import KvEvent, KvEventKind
from tandem.kv.hashing import hash_blocks
from tandem.proto.router.v1 import router_pb2


def _events_per_second(num_events: int, hashes_per_event: int, num_workers: int, seed: int) -> tuple[float, float]:
    """Store then remove ``num_events`` events spread over workers; (events/s, blocks/s)."""
    rng = random.Random(seed)
    index = KvIndex()
    worker_ids = [f"worker-{i}" for i in range(num_workers)]
    for worker_id in worker_ids:
        index.add_worker(worker_id)
    half = num_events // 2
    stored: list[tuple[str, KvEvent]] = []
    removed: list[tuple[str, KvEvent]] = []
    next_id = dict.fromkeys(worker_ids, 1)
    batches: list[tuple[str, tuple[int, ...]]] = []
    for n in range(half):
        worker_id = worker_ids[n % num_workers]
        hashes = tuple(rng.getrandbits(64) for _ in range(hashes_per_event))
        batches.append((worker_id, hashes))
        stored.append((worker_id, KvEvent(next_id[worker_id], KvEventKind.STORED, hashes)))
        next_id[worker_id] += 1
    for worker_id, hashes in batches:  # evict in the order stored, as an LRU pool does
        removed.append((worker_id, KvEvent(next_id[worker_id], KvEventKind.REMOVED, hashes)))
        next_id[worker_id] += 1
    apply = index.apply
    started = time.perf_counter()
    for worker_id, event in stored:
        apply(worker_id, event)
    for worker_id, event in removed:
        apply(worker_id, event)
    elapsed = time.perf_counter() - started
    assert index.num_blocks == 0, "every stored block should have been removed"
    return 2 * half / elapsed, 2 * half * hashes_per_event / elapsed


def _build_router(num_blocks: int, num_workers: int, prompt: Sequence[int], block_size: int,
                  seed: int) -> KvRouter:
    """``num_blocks`` indexed over ``num_workers``; worker 0 holds the whole prompt, worker 1 half."""
    rng = random.Random(seed)
    router = KvRouter(rng=random.Random(seed))
    prompt_hashes = hash_blocks(prompt, block_size)
    for n in range(num_workers):
        router.add_worker(f"worker-{n}", publishes_events=True)
    router.index.store("worker-0", prompt_hashes)
    router.index.store("worker-1", prompt_hashes[: len(prompt_hashes) // 2])
    per_worker = (num_blocks - len(prompt_hashes)) // num_workers
    for n in range(num_workers):
        router.index.store(f"worker-{n}", [rng.getrandbits(64) for _ in range(per_worker)])
    return router


def _timings(fn: Callable[[int], object], iterations: int) -> list[float]:
    for i in range(min(50, iterations)):  # warm-up
        fn(-1 - i)
    samples = []
    for i in range(iterations):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    return samples


def _p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_microbench", description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000, help="events applied per measurement")
    parser.add_argument("--blocks", type=int, default=1_000_000, help="blocks indexed for the decision")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=8000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=2000, help="decisions timed per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows: list[tuple[str, str, str]] = []
    for hashes_per_event in (1, 16):
        events_s, blocks_s = _events_per_second(args.events, hashes_per_event, args.workers, args.seed)
        rows.append((f"events applied, {hashes_per_event} block(s)/event", f"{events_s:,.0f} events/s",
                     f"{blocks_s:,.0f} blocks/s"))

    rng = random.Random(args.seed)
    prompt = [rng.randrange(49152) for _ in range(args.prompt_tokens)]
    router = _build_router(args.blocks, args.workers, prompt, args.block_size, args.seed)
    gc.collect()
    candidates = [(f"worker-{n}", args.block_size) for n in range(args.workers)]
    miss = [rng.randrange(49152) for _ in range(args.prompt_tokens)]
    prompt_hashes = hash_blocks(prompt, args.block_size)
    # As the frontend sends it: the prompt's block hashes computed there, so the router hashes nothing.
    with_hashes = router_pb2.RouteRequest(token_ids=prompt, block_hashes=prompt_hashes, block_size=args.block_size)
    scenarios = {
        "cached, hashes sent by the frontend": with_hashes,
        "cached, hashed in the router": router_pb2.RouteRequest(token_ids=prompt),
        "uncached (first block misses), hashed in the router": router_pb2.RouteRequest(token_ids=miss),
    }

    def decide(request: router_pb2.RouteRequest) -> Callable[[int], object]:
        def run(i: int) -> object:
            evaluation = router.evaluate(request.token_ids, candidates, block_hashes=request.block_hashes,
                                         hashes_block_size=request.block_size)
            chosen = router.pick(evaluation)
            router.record_routed(f"r{i}", chosen.worker_id, evaluation)
            router.on_finished(f"r{i}")  # keep the load flat between samples
            return chosen
        return run

    for name, request in scenarios.items():
        samples = _timings(decide(request), args.iterations)
        rows.append((f"decision, {len(request.token_ids)} tokens, {name}",
                     f"p50 {_p(samples, 0.5) * 1e3:.3f} ms", f"p99 {_p(samples, 0.99) * 1e3:.3f} ms"))
    hash_samples = _timings(lambda i: hash_blocks(prompt, args.block_size), args.iterations)
    walk_samples = _timings(lambda i: router.index.overlaps(prompt_hashes), args.iterations)
    rows.append(("  of which hashing the prompt", f"p50 {_p(hash_samples, 0.5) * 1e3:.3f} ms",
                 f"p99 {_p(hash_samples, 0.99) * 1e3:.3f} ms"))
    rows.append(("  of which the index walk", f"p50 {_p(walk_samples, 0.5) * 1e3:.3f} ms",
                 f"p99 {_p(walk_samples, 0.99) * 1e3:.3f} ms"))

    print(f"\nrouter microbenchmark: {router.index.num_blocks:,} blocks indexed on {args.workers} workers, "
          f"block size {args.block_size}, {args.iterations} decisions per scenario; a decision is evaluate + "
          f"pick + record (the last uncached one took {statistics.fmean(samples) * 1e3:.3f} ms on average)\n")
    width = max(len(row[0]) for row in rows)
    print(f"{'measurement':<{width}}  {'rate / p50':>22}  {'blocks/s / p99':>22}")
    print("-" * (width + 48))
    for name, first, second in rows:
        print(f"{name:<{width}}  {first:>22}  {second:>22}")
    print("\ntargets: >= 500,000 events/s; decision p99 < 1 ms")


if __name__ == "__main__":
    main()
