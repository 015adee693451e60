"""Shared-prefix workload: kv vs round-robin vs least-loaded routing on real processes, in one run.

Several tenants, each with its own ~1,000-token system prompt, send many short questions at a fixed
concurrency to 2 decode workers (router + workers + frontend started fresh per policy, so every
policy starts with cold caches). Each worker's KV pool holds only part of all tenants' prompts, as
in production, so where a request lands decides whether its prefix is still cached.

Prints TTFT p50/p99, throughput and the measured prefix-hit rate (cached prompt tokens / prompt
tokens, reported by the workers) per policy, and the oracle hit rate: every request after its
tenant's first one hits its whole system prompt (no router can beat that with cold caches).
The default run takes ~4 minutes on a 2-core CPU machine (SmolLM2-135M, one torch thread per
worker, where a cold 1,000-token prefill takes seconds).
Usage: python benchmarks/prefix_routing.py [--tenants 6] [--questions 6] [--concurrency 4] [--help]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median, percentile, table  # noqa: E402

from tandem import procs  # noqa: E402

BLOCK_SIZE = 16
# A CPU worker can go seconds between tokens under this load: not a hung worker, no migration.
_FRONTEND_ENV = {"TANDEM_STALL_TIMEOUT_S": "600", "TANDEM_FIRST_TOKEN_TIMEOUT_S": "0", "OMP_NUM_THREADS": "1"}


@dataclass(slots=True, frozen=True)
class Request:
    tenant: int
    prompt: list[int]
    num_prefix_tokens: int


@dataclass
class PolicyResult:
    policy: str
    ttft_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_failed: int = 0
    wall_s: float = 0.0
    predicted_hit_rate: float | None = None  # the kv router's own estimate

    @property
    def hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else float("nan")


def build_workload(args: argparse.Namespace) -> list[Request]:
    """``questions`` per tenant, interleaved at random (seeded) as independent users would send them."""
    rng = random.Random(args.seed)
    prefix_tokens = args.prefix_tokens // BLOCK_SIZE * BLOCK_SIZE  # whole blocks: all of it is cacheable
    prefixes = [[rng.randrange(200, 30_000) for _ in range(prefix_tokens)] for _ in range(args.tenants)]
    requests = [
        Request(tenant, prefixes[tenant] + [rng.randrange(200, 30_000) for _ in range(args.question_tokens)],
                prefix_tokens)
        for tenant in range(args.tenants) for _ in range(args.questions)
    ]
    rng.shuffle(requests)
    return requests


def oracle_hit_rate(requests: list[Request]) -> float:
    seen: set[int] = set()
    cached = 0
    for request in requests:
        cached += request.num_prefix_tokens if request.tenant in seen else 0
        seen.add(request.tenant)
    return cached / sum(len(request.prompt) for request in requests)


class Mesh:
    """Router (given policy), decode workers and a frontend as child processes on free ports."""

    def __init__(self, policy: str, args: argparse.Namespace, model_path: Path) -> None:
        router_port, self.router_metrics_port = procs.free_port(), procs.free_port()
        self.http_port = procs.free_port()
        router = f"127.0.0.1:{router_port}"
        self.processes: list[subprocess.Popen[bytes]] = [procs.spawn("router", [
            "--host", "127.0.0.1", "--port", str(router_port), "--metrics-port", str(self.router_metrics_port),
            "--policy", policy, *args.router_args], env={"TANDEM_LOG_LEVEL": "WARNING"})]
        self.worker_ports = [procs.free_port() for _ in range(args.workers)]
        for n, port in enumerate(self.worker_ports):
            self.processes.append(procs.spawn("decode", [
                "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                "--router-address", router, "--worker-id", f"decode-{n}", "--num-threads", "1",
                "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len", "2048"],
                env={"OMP_NUM_THREADS": "1", "TANDEM_LOG_LEVEL": "WARNING"}))
        self.processes.append(procs.spawn("frontend", [
            "--model", str(model_path), "--host", "127.0.0.1", "--http-port", str(self.http_port),
            "--grpc-port", str(procs.free_port()), "--router-address", router, "--max-model-len", "2048"],
            env={**_FRONTEND_ENV, "TANDEM_LOG_LEVEL": "WARNING"}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/completions"

    def wait_ready(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError("the mesh did not come up")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            return (procs.http_ok(f"http://127.0.0.1:{self.http_port}/health")
                    and all(procs.grpc_serving(f"127.0.0.1:{port}") for port in self.worker_ports)
                    and self.router_metric("tandem_router_registered_workers") == len(self.worker_ports))
        except Exception:  # a port raced away to another process answers garbage: not ready yet
            return False

    def router_metric(self, name: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(f"http://127.0.0.1:{self.router_metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return float("nan")
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples if sample.name == name)

    def stop(self) -> None:
        procs.stop_all(list(reversed(self.processes)))


async def _one(client: httpx.AsyncClient, url: str, request: Request, max_tokens: int,
               result: PolicyResult) -> None:
    body = {"prompt": request.prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_s: float | None = None
    usage = None
    try:
        async with client.stream("POST", url, json=body, timeout=600) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first_s is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first_s = time.perf_counter() - started
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as error:
        print(f"  request failed: {error}", file=sys.stderr)
        result.num_failed += 1
        return
    if first_s is not None:
        result.ttft_s.append(first_s)
    if usage:
        result.num_prompt_tokens += usage["prompt_tokens"]
        result.num_output_tokens += usage["completion_tokens"]
        result.num_cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)


async def run_workload(url: str, requests: list[Request], concurrency: int, max_tokens: int,
                       result: PolicyResult) -> None:
    """``concurrency`` users, each sending its next request when the previous one has finished."""
    queue = list(reversed(requests))

    async def user(client: httpx.AsyncClient) -> None:
        while queue:
            await _one(client, url, queue.pop(), max_tokens, result)

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - started


def run_policy(policy: str, args: argparse.Namespace, model_path: Path, requests: list[Request]) -> PolicyResult:
    mesh = Mesh(policy, args, model_path)
    result = PolicyResult(policy)
    try:
        mesh.wait_ready()
        print(f"{policy}: mesh ready; {len(requests)} requests at concurrency {args.concurrency}", flush=True)
        asyncio.run(run_workload(mesh.url, requests, args.concurrency, args.max_tokens, result))
        if policy == "kv":
            blocks = mesh.router_metric("tandem_router_kv_routed_cached_blocks_total")
            prompt_blocks = sum(len(r.prompt) // BLOCK_SIZE for r in requests)
            result.predicted_hit_rate = blocks / prompt_blocks
        print(f"{policy}: done in {result.wall_s:.0f} s", flush=True)
    finally:
        mesh.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=["kv", "round-robin", "least-loaded"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--questions", type=int, default=6, help="questions per tenant")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="system prompt length per tenant")
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    # 256 blocks x 16 tokens: four of the six 63-block system prompts, less what running requests use.
    parser.add_argument("--num-kv-blocks", type=int, default=256, help="KV pool per worker, in blocks")
    parser.add_argument("--router-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to every router, e.g. --router-args --kv-overlap-weight 1 (put it last)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="model directory; default: the default model")
    args = parser.parse_args()

    from tandem.models import resolve_model

    model_path = resolve_model(args.model or None)
    requests = build_workload(args)
    results = [run_policy(policy, args, model_path, requests) for policy in args.policies]

    rows = []
    for result in results:
        predicted = "" if result.predicted_hit_rate is None else f"{result.predicted_hit_rate:.1%}"
        rows.append([result.policy, len(result.ttft_s), result.num_failed, median(result.ttft_s),
                     percentile(result.ttft_s, 99), len(result.ttft_s) / result.wall_s,
                     result.num_output_tokens / result.wall_s, f"{result.hit_rate:.1%}", predicted])
    oracle = oracle_hit_rate(requests)
    print(f"\nprefix routing: {args.tenants} tenants x {args.questions} questions, "
          f"{args.prefix_tokens}-token system prompts, {args.workers} decode workers "
          f"({args.num_kv_blocks} KV blocks each), concurrency {args.concurrency}, max_tokens {args.max_tokens}\n")
    print(table(["policy", "ok", "failed", "TTFT p50 s", "TTFT p99 s", "req/s", "out tok/s", "hit rate",
                 "kv predicted"], rows))
    print(f"\noracle hit rate (every request after its tenant's first hits its whole prompt): {oracle:.1%}")
    by_policy = {result.policy: result for result in results}
    if "kv" in by_policy and "round-robin" in by_policy:
        kv, rr = by_policy["kv"], by_policy["round-robin"]
        print(f"kv TTFT p50 is {median(rr.ttft_s) / median(kv.ttft_s):.1f}x lower than round-robin's; "
              f"kv hit rate is {kv.hit_rate / oracle:.0%} of the oracle's")


if __name__ == "__main__":
    main()
