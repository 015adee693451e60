"""The mesh's own cost: the same streamed requests through the frontend and straight into the engine.

Starts `tandem up` with one decode worker (or uses --url), runs each concurrency level several
times against both, and prints req/s, output tokens/s, TTFT and ITL p50/p99 and mesh/engine ratios.
Both paths start the clock before tokenising the prompt (the frontend tokenises; so must an
in-process caller). Runs alternate engine-first and mesh-first, and each ratio is the median of
the ratios of adjacent (engine, mesh) pairs: shared machines drift by more than the mesh costs, and
pairing cancels the drift. The spread column gives the lowest and highest pair ratio of TTFT p50,
and the CI columns a bootstrap 95% confidence interval of the median pair ratio of TTFT and ITL p50;
a line per level then says whether the mesh stays inside the 5% target (the whole interval under 1.05),
is over it (the whole interval above) or cannot be told apart from it with this many pairs;
"step ms" is the mean forward pass of the in-process engine or of the mesh's worker (from its /metrics)
during the runs, so a slower worker step tells apart from relay costs.
Each level's verdict line also gives the ratio of the two paths' TTFT (and ITL) p50 over every
request of every run, the literal "TTFT p50" of the target, with a CI95 that resamples pairs.
``--save FILE`` appends the runs to a file; ``--pool FILE...`` reports the saved runs of several
invocations together (pairs of one setting pooled), without running anything; a FILE ending in .gz
is read gzipped (benchmarks/results/ keeps the runs behind the README's pooled figures).
Usage: python benchmarks/load.py [--concurrency 1 4 16] [--runs 5] [--max-tokens 48] [--save runs.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (  # noqa: E402
    RunResult,
    pool,
    print_report,
    report_level,
    save_level,
)

TOPICS = ["the sea", "a red fox", "mountains at dawn", "an old library", "a quiet train", "the first snow",
          "a lighthouse", "city lights", "a lost key", "the desert wind", "a paper boat", "autumn leaves",
          "a clockmaker", "the northern sky", "a garden gate", "a river stone"]


class StepClock:
    """The in-process engine's on_step callback: forward passes and their time, summed."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.count = 0

    def __call__(self, step) -> None:  # type: ignore[no-untyped-def]
        self.total_s += step.duration_s
        self.count += 1


def worker_steps(metrics_url: str | None) -> tuple[float, int]:
    """(seconds, count) of the worker's tandem_worker_step_duration_seconds histogram."""
    if metrics_url is None:
        return 0.0, 0
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    total = re.search(r"^tandem_worker_step_duration_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^tandem_worker_step_duration_seconds_count (\S+)$", text, re.M)
    return (float(total.group(1)), int(float(count.group(1)))) if total and count else (0.0, 0)


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(n)]


class RawSseClient:
    """The smallest HTTP/1.1 client that streams the frontend's SSE replies: keep-alive connections, the
    request written in one piece, chunked bodies split into lines. A streamed request through aiohttp's
    client costs about 1 ms more of TTFT on a 2-core host (building the request, parsing the reply):
    that is the client's cost, not the mesh's. ``--client aiohttp`` measures with aiohttp instead."""

    def __init__(self, url: str) -> None:
        address = url.removeprefix("http://").rstrip("/")
        self._host, _, port = address.partition(":")
        self._port = int(port or 80)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def lines(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST ``body`` to ``path``; the reply body's lines as they arrive. Raises on a status other than 200."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self._host, self._port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self._host.encode(), self._port,
                                                          len(body), body))
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if status.split()[1:2] != [b"200"]:
            writer.close()
            raise RuntimeError(f"{path}: {status.decode().strip()}")
        if headers.get("transfer-encoding") != "chunked":
            writer.close()
            raise RuntimeError(f"{path}: expected a chunked (streamed) reply, got headers {headers}")
        pending = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line
        await reader.readline()  # the blank line after the last chunk
        if pending:
            yield pending
        if headers.get("connection") == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class MeshClient:
    """The benchmark's HTTP client of one frontend, kept for the whole benchmark: its connections stay open
    between runs, as an OpenAI client's connection pool does between requests. (A client made per run
    opened a new TCP connection for each run's first request, which the frontend then had to accept:
    a cost the in-process engine has no counterpart for, and one a real client pays once.)
    ``kind`` "raw" is RawSseClient, "aiohttp" aiohttp's client."""

    def __init__(self, url: str, kind: str = "raw") -> None:
        self.url = url
        self.kind = kind
        self._raw = RawSseClient(url)
        self._session: Any = None  # an aiohttp.ClientSession, opened on first use (inside the loop)

    async def lines(self, path: str, body: dict[str, object]) -> AsyncIterator[bytes]:
        """POST ``body`` to ``path`` and yield the streamed reply's lines."""
        if self.kind == "raw":
            async for line in self._raw.lines(path, json.dumps(body).encode()):
                yield line
            return
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        async with self._session.post(f"{self.url}{path}", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.content:  # one SSE line at a time
                yield line

    async def close(self) -> None:
        self._raw.close()
        if self._session is not None:
            await self._session.close()


async def run_mesh(client: MeshClient, model: str, texts: list[str], concurrency: int, max_tokens: int,
                   metrics_url: str | None = None, chat: bool = False) -> RunResult:
    """Stream ``texts`` through the frontend's /v1/completions (``chat``: each as a user message to
    /v1/chat/completions) with ``client``."""
    result = RunResult()
    steps_before = worker_steps(metrics_url)
    sem = asyncio.Semaphore(concurrency)
    path = f"/v1/{'chat/' if chat else ''}completions"

    async def one(text: str) -> None:
        async with sem:
            start = time.perf_counter()
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                    **({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})}
            last = None
            async for raw in client.lines(path, body):
                if not raw.startswith(b"data: {"):
                    continue  # blank separators and data: [DONE]
                chunk = json.loads(raw[6:])
                if chunk.get("usage"):
                    result.output_tokens += chunk["usage"]["completion_tokens"]
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if not (choice.get("delta", {}).get("content") if chat else choice.get("text")):
                    continue  # usage, role-only or finish-only chunks carry no token text
                last = result.note_token(start, last)
            result.requests += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    result.wall_s = time.perf_counter() - started
    steps_after = worker_steps(metrics_url)
    result.step_s, result.steps = steps_after[0] - steps_before[0], steps_after[1] - steps_before[1]
    return result


async def run_engine(engine, texts: list[str], concurrency: int, max_tokens: int,  # type: ignore[no-untyped-def]
                     clock: StepClock | None = None, chat: bool = False) -> RunResult:
    from tandem.engine.types import EngineRequest, SamplingParams

    result = RunResult()
    steps_before = (clock.total_s, clock.count) if clock else (0.0, 0)
    sem = asyncio.Semaphore(concurrency)
    counter = iter(range(10**9))

    async def one(text: str) -> None:
        async with sem:
            start = time.perf_counter()
            if chat:  # the chat template, as the frontend applies it
                ids = list(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                                add_generation_prompt=True, tokenize=True,
                                                                return_dict=False))
            else:
                ids = engine.tokenizer(text)["input_ids"]
            request = EngineRequest(f"bench-{next(counter)}", ids,
                                    SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            last = None
            async for out in engine.generate(request):
                if out.finished:
                    result.output_tokens += out.num_output_tokens
                if not out.text:  # the frontend sends no chunk for a token without text (EOS): time alike
                    continue
                last = result.note_token(start, last)
            result.requests += 1

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    result.wall_s = time.perf_counter() - started
    if clock is not None:
        result.step_s, result.steps = clock.total_s - steps_before[0], clock.count - steps_before[1]
    return result


def start_mesh(threads: int, model: Path, device: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """The mesh's process, its frontend URL and its one worker's metrics URL."""
    from tandem import procs

    port = procs.free_port()
    worker_port = procs.free_port()  # the worker's metrics go on the next port
    log = tempfile.TemporaryFile()  # the services' output, shown if the mesh fails to start
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", "--port", str(port),
                             "--grpc-port", str(procs.free_port()), "--router-port", "0",
                             "--worker-base-port", str(worker_port), "--num-threads", str(threads),
                             "--model", str(model),
                             "--device", device],
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while not procs.http_ok(f"{url}/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            proc.wait(60)
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-20:]
            raise SystemExit("the mesh did not start; the end of its output:\n" + "\n".join(tail))
        time.sleep(0.5)
    return proc, url, f"http://127.0.0.1:{worker_port + 1}/metrics"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-level", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the worker and in-process engine")
    parser.add_argument("--url", default=None, help="use a running frontend instead of starting one")
    parser.add_argument("--worker-metrics-url", default=None, help="with --url: its worker's /metrics (step times)")
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cpu", help="torch device of the worker and the in-process engine")
    parser.add_argument("--chat", action="store_true",
                        help="chat completions (each prompt a user message) instead of completions: an instruct "
                             "model's first token then has text, so TTFT is one step, not two")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                        help="HTTP client of the mesh runs: raw (RawSseClient, the least client cost) or aiohttp")
    parser.add_argument("--save", type=Path, default=None,
                        help="append each level's runs to this file (JSON lines), for --pool")
    parser.add_argument("--pool", type=Path, nargs="+", default=None,
                        help="no runs: report the runs saved with --save in these files, pairs of every "
                             "invocation with the same setting together")
    args = parser.parse_args()
    if args.pool:
        pool(args.pool)
        return

    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.engine import HFEngine
    from tandem.models import resolve_model, served_model_name

    torch.set_num_threads(args.threads)
    model_path = args.model or resolve_model(None)
    model_name = served_model_name(model_path)
    mesh_proc, url, metrics_url = ((None, args.url, args.worker_metrics_url) if args.url
                                   else start_mesh(args.threads, model_path, args.device))
    clock = StepClock()
    engine = HFEngine(EngineConfig(model_path=model_path, num_threads=args.threads, device=args.device),
                      on_step=clock)
    await engine.start()
    client = MeshClient(url, args.client)
    setting: dict[str, object] = {"device": args.device, "model": model_name, "chat": args.chat,
                                  "max_tokens": args.max_tokens, "requests_per_level": args.requests_per_level,
                                  "client": args.client}
    rows: list[list[object]] = []
    verdicts: list[str] = []
    try:
        texts = prompts(args.requests_per_level)
        await run_engine(engine, texts[:2], 2, 4)  # warm-up both paths
        # As many requests at once as the highest level sends: the client opens its connections now.
        widest = max(args.concurrency)
        await run_mesh(client, model_name, prompts(widest), widest, 4)
        for concurrency in args.concurrency:
            mesh_runs, engine_runs = [], []
            for i in range(args.runs):  # pairs, alternating which goes first
                for path in (("engine", "mesh") if i % 2 == 0 else ("mesh", "engine")):
                    if path == "engine":
                        engine_runs.append(await run_engine(engine, texts, concurrency, args.max_tokens, clock,
                                                            args.chat))
                    else:
                        mesh_runs.append(await run_mesh(client, model_name, texts, concurrency, args.max_tokens,
                                                        metrics_url, args.chat))
            level_rows, verdict = report_level(concurrency, mesh_runs, engine_runs)
            rows += level_rows
            verdicts.append(verdict)
            if args.save:
                save_level(args.save, setting, concurrency, mesh_runs, engine_runs)
    finally:
        await client.close()
        await engine.shutdown()
        if mesh_proc is not None:
            mesh_proc.terminate()
            mesh_proc.wait(60)
    print(f"\n{args.requests_per_level} requests per level, {args.max_tokens} output tokens each, "
          f"{args.runs} runs (medians; ratios: medians of paired runs), {args.threads} torch thread(s), "
          f"device {args.device}, {'chat completions' if args.chat else 'completions'}, {args.client} HTTP client\n")
    print_report(rows, verdicts)


if __name__ == "__main__":
    from tandem import lifecycle

    lifecycle.run(main())  # the event loop the mesh's services run (uvloop unless TANDEM_EVENT_LOOP says otherwise)
