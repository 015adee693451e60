"""KV-aware routing with real processes: a router (--policy kv), two decode workers (one torch thread
each) and a frontend, started by PID on free ports; repeated long prefixes must follow their cache."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem import procs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

WORKER_IDS = ("decode-a", "decode-b")
# A ~1,000-token "system prompt" of valid token ids (63 full blocks of 16), then short questions.
PREFIX = [200 + (i * 7919) % 30_000 for i in range(63 * 16)]
FLOOD = 24  # concurrent requests; at overlap weight 1 the holder takes ~16 before spilling
# A 2-core machine running a hot-prefix flood on one worker can go seconds between tokens; that is
# load, not a hung worker, so the frontend's stall detection must not move the requests away.
_FRONTEND_ENV = {"TANDEM_STALL_TIMEOUT_S": "120", "TANDEM_FIRST_TOKEN_TIMEOUT_S": "0", "OMP_NUM_THREADS": "1"}


def _question(i: int) -> list[int]:
    return [40_000 + i * 31 + j for j in range(20)]


@dataclass
class KvMesh:
    processes: list[subprocess.Popen[bytes]]
    completions_url: str
    router_metrics_url: str

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.router_metrics_url, timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def routed(self) -> dict[str, float]:
        return {w: self.metric("tandem_router_kv_routed_requests_total", worker_id=w) for w in WORKER_IDS}

    def complete(self, prompt: list[int], max_tokens: int, **extra: Any) -> tuple[float, int]:
        """(seconds, cached prompt tokens) of one greedy completion; with max_tokens=1 that is the TTFT."""
        started = time.perf_counter()
        response = httpx.post(self.completions_url, json={"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "ignore_eos": True, **extra},
                              timeout=300)
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return elapsed, int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.fixture(scope="module")
def kv_mesh(model_path: Path) -> Iterator[KvMesh]:
    router_port, router_metrics_port, http_port = procs.free_port(), procs.free_port(), procs.free_port()
    router_address = f"127.0.0.1:{router_port}"
    processes = [procs.spawn("router", ["--host", "127.0.0.1", "--port", str(router_port),
                                        "--metrics-port", str(router_metrics_port), "--policy", "kv"])]
    worker_ports = [procs.free_port() for _ in WORKER_IDS]
    for worker_id, port in zip(WORKER_IDS, worker_ports, strict=True):
        processes.append(procs.spawn("decode", [
            "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
            "--router-address", router_address, "--worker-id", worker_id, "--num-threads", "1",
            "--num-kv-blocks", "512", "--max-model-len", "2048"], env={"OMP_NUM_THREADS": "1"}))
    processes.append(procs.spawn("frontend", [
        "--model", str(model_path), "--host", "127.0.0.1", "--http-port", str(http_port),
        "--grpc-port", str(procs.free_port()), "--router-address", router_address, "--max-model-len", "2048"],
        env=_FRONTEND_ENV))
    mesh = KvMesh(processes, f"http://127.0.0.1:{http_port}/v1/completions",
                  f"http://127.0.0.1:{router_metrics_port}/metrics")
    try:
        deadline = time.monotonic() + 300
        while not (procs.http_ok(f"http://127.0.0.1:{http_port}/health")
                   and all(procs.grpc_serving(f"127.0.0.1:{port}") for port in worker_ports)
                   and mesh.metric("tandem_router_registered_workers") == len(WORKER_IDS)):
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise RuntimeError("the KV mesh did not come up")
            time.sleep(0.5)
        yield mesh
    finally:
        procs.stop_all(list(reversed(processes)))


def test_a_repeated_long_prefix_goes_to_the_worker_that_holds_it(kv_mesh: KvMesh) -> None:
    before = kv_mesh.routed()
    cold_s, cold_cached = kv_mesh.complete(PREFIX + _question(0), 1)
    holder = max(WORKER_IDS, key=lambda w: kv_mesh.routed()[w] - before[w])
    time.sleep(0.5)  # the worker's stored-block events reach the router over its stream
    warm = [kv_mesh.complete(PREFIX + _question(i), 1) for i in range(1, 5)]
    routed = {w: kv_mesh.routed()[w] - before[w] for w in WORKER_IDS}
    other = next(w for w in WORKER_IDS if w != holder)
    assert routed == {holder: 5, other: 0}, routed  # every repeat went where the prefix was
    assert cold_cached == 0 and all(cached >= len(PREFIX) for _, cached in warm), warm  # and hit there
    assert max(s for s, _ in warm) < cold_s / 2, (cold_s, warm)  # which shows in the time to first token
    predicted_hits = (kv_mesh.metric("tandem_router_kv_predicted_hit_rate_count")
                      - kv_mesh.metric("tandem_router_kv_predicted_hit_rate_bucket", le="0.9"))
    assert predicted_hits >= 4  # and in the router's predicted hit rate
    assert kv_mesh.metric("tandem_router_kv_events_applied_total") > 0
    assert kv_mesh.metric("tandem_router_kv_index_blocks") >= 63


def test_a_flood_of_one_hot_prefix_spreads_once_its_worker_is_busy(kv_mesh: KvMesh) -> None:
    kv_mesh.complete(PREFIX + _question(99), 1)  # one worker holds the prefix (and is idle)
    time.sleep(0.5)
    before = kv_mesh.routed()
    # The request's own weights (extra_body "routing"): at the default overlap weight of 4 the holder
    # would take ~60 of these before a cold prefill elsewhere is cheaper; at 1, ~16.
    routing = {"routing": {"kv_overlap_weight": 1}}
    with ThreadPoolExecutor(FLOOD) as pool:
        results: list[Any] = list(pool.map(
            lambda i: kv_mesh.complete(PREFIX + _question(100 + i), 4, **routing), range(FLOOD)))
    routed = {w: kv_mesh.routed()[w] - before[w] for w in WORKER_IDS}
    assert sum(routed.values()) == FLOOD, routed  # no request failed over elsewhere
    assert min(routed.values()) >= 1, routed  # the busy holder did not get them all
    assert max(routed.values()) >= FLOOD // 2, routed  # but most still went to the cached prefix
    assert sum(1 for _, cached in results if cached >= len(PREFIX)) >= FLOOD // 2


def test_routing_overrides_are_validated_at_the_frontend(kv_mesh: KvMesh) -> None:
    response = httpx.post(kv_mesh.completions_url, json={"prompt": PREFIX[:20], "max_tokens": 1,
                                                         "routing": {"kv_overlap_weight": -1}}, timeout=30)
    assert response.status_code == 400
    assert "routing.kv_overlap_weight" in response.text
