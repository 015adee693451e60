"""Faults injected into a real mesh (router, two decode workers, frontend as processes) while streams
run: a killed, hung, scaled-down worker or a killed router must cost the client nothing."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tandem.local_mesh import LocalMesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "SmolLM2-135M-Instruct"
STALL_TIMEOUT_S = 1.5
NUM_STREAMS = 8
MAX_TOKENS = 40
PROMPTS = [f"Story {i}: a {animal} walked into the" for i, animal in
           enumerate(["cat", "dog", "fox", "owl", "bee", "cow", "elk", "yak"])]


@dataclass
class Stream:
    text: str = ""
    num_chunks: int = 0
    error: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


async def stream_completion(client: httpx.AsyncClient, prompt: str, stream: Stream, *,
                            temperature: float = 0.0, seed: int | None = None, max_tokens: int = MAX_TOKENS) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if seed is not None:
        body["seed"] = seed
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            stream.error = f"HTTP {response.status_code}: {(await response.aread()).decode()}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                stream.error = event["error"]["message"]
                return
            if event.get("usage"):
                stream.usage = event["usage"]
            for choice in event.get("choices", []):
                stream.text += choice["text"]
                stream.num_chunks += 1
                stream.finish_reason = choice.get("finish_reason") or stream.finish_reason


async def run_streams(mesh: LocalMesh, *, temperature: float = 0.0, fault: object = None,
                      after_chunks: int = 6) -> list[Stream]:
    """NUM_STREAMS concurrent streams; ``fault()`` runs once every stream has ``after_chunks`` chunks."""
    streams = [Stream() for _ in PROMPTS]
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=120) as client:
        tasks = [asyncio.create_task(stream_completion(client, prompt, stream, temperature=temperature,
                                                       seed=1000 + i if temperature else None))
                 for i, (prompt, stream) in enumerate(zip(PROMPTS, streams, strict=True))]
        if fault is not None:
            deadline = time.monotonic() + 60
            while any(s.num_chunks < after_chunks and s.error is None and not s.finish_reason for s in streams):
                assert time.monotonic() < deadline, "streams did not start"
                await asyncio.sleep(0.005)
            await asyncio.to_thread(fault)  # type: ignore[arg-type]
        await asyncio.gather(*tasks)
    return streams


def frontend_metric(mesh: LocalMesh, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(f"{mesh.http_url}/metrics", timeout=10).text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def restart_worker(mesh: LocalMesh, index: int) -> None:
    mesh.workers[index].restart()
    mesh.wait_worker_healthy(f"decode-{index}")


@pytest.fixture(scope="module")
def mesh(model_path: Path) -> Iterator[LocalMesh]:
    running = LocalMesh(2, model_path=model_path, frontend_args=["--stall-timeout-s", str(STALL_TIMEOUT_S)])
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def greedy_reference(mesh: LocalMesh) -> list[str]:
    streams = asyncio.run(run_streams(mesh))
    assert all(s.error is None and s.finish_reason == "length" for s in streams), streams
    return [s.text for s in streams]


def assert_all_identical(streams: list[Stream], reference: list[str]) -> None:
    errors = [s.error for s in streams if s.error]
    assert not errors, errors
    for i, (stream, expected) in enumerate(zip(streams, reference, strict=True)):
        assert stream.text == expected, f"stream {i} differs"
        assert stream.finish_reason == "length"
        # The counts are the request's, not the last worker's (which saw streamed tokens as prompt).
        assert stream.usage["completion_tokens"] == MAX_TOKENS, stream.usage


async def test_sigkill_a_worker_mid_stream_greedy_texts_are_unchanged(
        mesh: LocalMesh, greedy_reference: list[str]) -> None:
    migrated_before = frontend_metric(mesh, "tandem_frontend_migrations_total")
    streams = await run_streams(mesh, fault=lambda: mesh.workers[1].send(signal.SIGKILL))
    assert_all_identical(streams, greedy_reference)
    assert frontend_metric(mesh, "tandem_frontend_migrations_total") - migrated_before >= 1
    assert "decode-1" not in mesh.healthy_workers()
    # The router names the process exit (same host), whether its poll or the closed sockets came first.
    exited = re.search(r'^tandem_router_workers_quarantined_total\{reason="exited"\} (\S+)$',
                       (await asyncio.to_thread(httpx.get, mesh.router_metrics_url, timeout=10)).text, re.MULTILINE)
    assert exited is not None and float(exited.group(1)) >= 1
    restart_worker(mesh, 1)  # not in a thread: see Child.start


async def test_sigkill_a_worker_mid_stream_seeded_sampling_is_unchanged(mesh: LocalMesh) -> None:
    reference = await run_streams(mesh, temperature=1.0)
    assert all(s.error is None for s in reference)
    streams = await run_streams(mesh, temperature=1.0, fault=lambda: mesh.workers[0].send(signal.SIGKILL))
    assert_all_identical(streams, [s.text for s in reference])
    restart_worker(mesh, 0)


async def test_sigstop_is_detected_and_migrated_and_sigcont_rejoins(
        mesh: LocalMesh, greedy_reference: list[str]) -> None:
    detected_after_s: list[float] = []

    def hang_worker_1() -> None:
        mesh.workers[1].send(signal.SIGSTOP)
        stopped = time.monotonic()
        while "decode-1" in mesh.healthy_workers():
            time.sleep(0.01)
        detected_after_s.append(time.monotonic() - stopped)

    stalled_before = frontend_metric(mesh, "tandem_frontend_migrations_total", 'reason="stalled"')
    started = time.monotonic()
    try:
        streams = await run_streams(mesh, fault=hang_worker_1)
        elapsed_s = time.monotonic() - started
        assert_all_identical(streams, greedy_reference)
        # Out of routing within the router's probe timeout (1 s) plus an interval, well under the stall limit.
        assert detected_after_s and detected_after_s[0] < 2.0, detected_after_s
        assert frontend_metric(mesh, "tandem_frontend_migrations_total", 'reason="stalled"') - stalled_before == 1
        assert elapsed_s < 60
        statuses = {s.info.worker_id: s for s in mesh.worker_statuses()}
        assert statuses["decode-1"].unhealthy_reason in ("silent", "reported_stalled")
    finally:
        mesh.workers[1].send(signal.SIGCONT)
    # The same process answers again: the router restores it, and it serves requests.
    rejoined_after_s = await asyncio.to_thread(mesh.wait_worker_healthy, "decode-1", 30)
    assert rejoined_after_s < 10
    streams = await run_streams(mesh)
    assert_all_identical(streams, greedy_reference)


async def test_sigterm_scale_down_under_load_shows_no_client_error(
        mesh: LocalMesh, greedy_reference: list[str]) -> None:
    late: list[Stream] = []

    def scale_down() -> None:
        mesh.workers[1].send(signal.SIGTERM)
        time.sleep(0.3)  # draining: new requests must go to the other worker

    streams = await run_streams(mesh, fault=scale_down)
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=120) as client:
        late = [Stream() for _ in range(2)]
        await asyncio.gather(*(stream_completion(client, PROMPTS[i], s) for i, s in enumerate(late)))
    assert_all_identical(streams, greedy_reference)
    assert_all_identical(late, greedy_reference[:2])
    assert mesh.workers[1].wait(60) == 0  # drained and exited cleanly
    restart_worker(mesh, 1)  # not in a thread: see Child.start


async def test_router_killed_streams_finish_new_requests_503_until_it_is_back(
        mesh: LocalMesh, greedy_reference: list[str]) -> None:
    refused: list[httpx.Response] = []

    def kill_router_and_try() -> None:
        mesh.router.kill()
        refused.append(httpx.post(f"{mesh.http_url}/v1/completions", timeout=30, json={
            "model": MODEL, "prompt": "hello", "max_tokens": 2}))

    streams = await run_streams(mesh, fault=kill_router_and_try)
    assert_all_identical(streams, greedy_reference)  # the router is off the token path
    assert refused[0].status_code == 503 and refused[0].headers.get("Retry-After")
    mesh.router.start()  # same port; the workers re-register, the frontend reconnects
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=30) as client:
        while True:
            reply = await client.post("/v1/completions", json={
                "model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
            if reply.status_code == 200:
                break
            assert reply.status_code == 503, reply.text
            assert time.monotonic() < deadline, "the mesh did not recover after the router came back"
            await asyncio.sleep(0.2)
    assert reply.json()["choices"][0]["text"] == greedy_reference[0]
    await asyncio.to_thread(mesh.wait_ready, 60)
