"""KServe ModelStreamInfer (tritonclient.grpc.aio) vs the OpenAI SSE path (/v1/completions), same
prompts, greedy, ignore_eos: output tokens/s and TTFT p50 at each concurrency, medians over runs.

Uses a running frontend (--grpc host:port --http host:port) or starts an in-process mesh (router,
one decode worker, frontend) on a background event loop that the clients share. The prompts go
in waves of the concurrency level, each wave through both paths in turn, so that load from
anything else on the machine hits both alike. Usage: python benchmarks/kserve_vs_openai.py [--concurrency 1 8] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # _stats, and services/ when run as a script
from _stats import median, percentile, table  # noqa: E402

TOPICS = ["the sea", "a red fox", "mountains at dawn", "an old library", "a quiet train", "the first snow",
          "a lighthouse", "city lights", "a lost key", "the desert wind", "a paper boat", "autumn leaves"]


@dataclass
class RunResult:
    ttft_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    wall_s: float = 0.0


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i})." for i in range(n)]


RequestFn = Callable[[str, RunResult], Coroutine[Any, Any, None]]


async def run_wave(one: RequestFn, texts: list[str], result: RunResult) -> None:
    """All ``texts`` at once (one wave of the concurrency level), added to ``result``."""
    started = time.perf_counter()
    await asyncio.gather(*(one(text, result) for text in texts))
    result.wall_s += time.perf_counter() - started


async def run_paired(paths: dict[str, RequestFn], texts: list[str], concurrency: int) -> dict[str, RunResult]:
    """One run: the prompts in waves of ``concurrency``, each wave through every path in turn
    (order alternating), so that both paths see the same load from whatever else runs here."""
    results = {name: RunResult() for name in paths}
    for index, start in enumerate(range(0, len(texts), concurrency)):
        wave = texts[start:start + concurrency]
        for name in (list(paths) if index % 2 == 0 else list(reversed(paths))):
            await run_wave(paths[name], wave, results[name])
    return results


def openai_request(client: Any, url: str, model: str, max_tokens: int) -> RequestFn:
    async def one(text: str, result: RunResult) -> None:
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = True
        async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens += chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and first:
                    result.ttft_s.append(time.perf_counter() - start)
                    first = False
    return one


def kserve_request(client: Any, model: str, max_tokens: int) -> RequestFn:
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode()

    def tensor(name: str, value: Any, datatype: str) -> Any:
        infer_input = grpcclient.InferInput(name, [1], datatype)
        infer_input.set_data_from_numpy(np.array([value], dtype=object if datatype == "BYTES" else bool))
        return infer_input

    async def one(text: str, result: RunResult) -> None:
        inputs = [tensor("text_input", text.encode(), "BYTES"), tensor("stream", True, "BOOL"),
                  tensor("sampling_parameters", sampling, "BYTES"),
                  tensor("return_num_output_tokens", True, "BOOL")]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": inputs,
                   "parameters": {"triton_enable_empty_final_response": True}}

        start = time.perf_counter()
        first = True
        async for response, error in client.stream_infer(requests()):
            if error is not None:
                raise RuntimeError(error.message())
            # TTFT is the first visible text on both paths: OpenAI skips empty deltas (a token
            # the detokeniser holds back), while ModelStreamInfer answers every token.
            if first and response.as_numpy("text_output")[0]:
                result.ttft_s.append(time.perf_counter() - start)
                first = False
            result.output_tokens += int(response.as_numpy("num_output_tokens")[0])
            if response.get_response().parameters["triton_final_response"].bool_param:
                break
    return one


def summarize(runs: list[RunResult]) -> dict[str, float]:
    return {"tok/s": median([r.output_tokens / r.wall_s for r in runs]),
            "ttft_p50_ms": median([percentile(r.ttft_s, 50) * 1e3 for r in runs])}


class InProcessMesh:
    """Router, one decode worker and the frontend on an event loop in a background thread."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mesh", daemon=True)
        self._servers: tuple[Any, ...] = ()

    def start(self) -> tuple[str, str]:
        from services.decode.config import DecodeConfig
        from services.decode.server import serve as serve_decode
        from services.frontend.server import FrontendConfig
        from services.frontend.server import serve as serve_frontend
        from services.router.config import RouterConfig
        from services.router.server import serve as serve_router
        from tandem.models import resolve_model

        model_path = resolve_model(None)

        async def start() -> tuple[Any, ...]:
            router = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
            worker = await serve_decode(DecodeConfig(host="127.0.0.1", port=0, metrics_port=0,
                                                     router_address=router.address, model=str(model_path),
                                                     num_threads=self.threads, drain_timeout_s=1))
            frontend = await serve_frontend(FrontendConfig(model=str(model_path), host="127.0.0.1", http_port=0,
                                                           grpc_port=0, router_address=router.address,
                                                           shutdown_grace_s=1))
            return router, worker, frontend

        self._thread.start()
        self._servers = asyncio.run_coroutine_threadsafe(start(), self.loop).result(300)
        frontend = self._servers[2]
        return f"127.0.0.1:{frontend.grpc_port}", f"127.0.0.1:{frontend.http_port}"

    def stop(self) -> None:
        router, worker, frontend = self._servers

        async def stop() -> None:
            await frontend.stop()
            await worker.stop(drain_timeout_s=1)
            await router.stop(grace_s=0)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


async def wait_ready(http_url: str, client: Any) -> None:
    deadline = time.monotonic() + 120
    while (await client.get(f"{http_url}/v2/health/ready")).status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("no healthy decode worker behind the frontend")
        await asyncio.sleep(0.1)


async def benchmark(args: argparse.Namespace, grpc_address: str, http_address: str) -> list[list[object]]:
    import httpx
    import tritonclient.grpc.aio as grpcclient

    http_url = f"http://{http_address}"
    rows: list[list[object]] = []
    async with httpx.AsyncClient(timeout=600) as http, grpcclient.InferenceServerClient(grpc_address) as triton:
        await wait_ready(http_url, http)
        model = args.model or (await http.get(f"{http_url}/v1/models")).json()["data"][0]["id"]
        paths = {"openai_sse": openai_request(http, http_url, model, args.max_tokens),
                 "kserve_stream": kserve_request(triton, model, args.max_tokens)}
        texts = prompts(args.requests)
        await run_paired(paths, texts[:2], 2)  # warm-up: connections, first-request costs
        for concurrency in args.concurrency:
            runs: dict[str, list[RunResult]] = {name: [] for name in paths}
            for _ in range(args.runs):
                for name, result in (await run_paired(paths, texts, concurrency)).items():
                    runs[name].append(result)
            summary = {name: summarize(results) for name, results in runs.items()}
            for name, values in summary.items():
                rows.append([concurrency, name, values["tok/s"], values["ttft_p50_ms"]])
            kserve, openai = summary["kserve_stream"], summary["openai_sse"]
            rows.append([concurrency, "kserve/openai", kserve["tok/s"] / openai["tok/s"],
                         kserve["ttft_p50_ms"] / openai["ttft_p50_ms"]])
            print(table(["concurrency", "path", "output tok/s", "TTFT p50 ms"], rows[-3:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the in-process worker")
    parser.add_argument("--grpc", default=None, help="a running frontend's gRPC host:port")
    parser.add_argument("--http", default=None, help="a running frontend's HTTP host:port")
    parser.add_argument("--model", default=None, help="served model name (default: the first listed)")
    args = parser.parse_args()
    if (args.grpc is None) != (args.http is None):
        parser.error("give both --grpc and --http, or neither to start an in-process mesh")

    from tandem.telemetry.logging import configure_logging

    configure_logging("kserve-bench", level="WARNING")  # the in-process mesh's logs would bury the table
    if args.grpc is not None:
        rows = asyncio.run(benchmark(args, args.grpc, args.http))
    else:
        mesh = InProcessMesh(args.threads)
        grpc_address, http_address = mesh.start()
        try:
            # The clients share the mesh's loop: grpc.aio wants one loop per process, and both
            # paths pay the same for it.
            rows = asyncio.run_coroutine_threadsafe(benchmark(args, grpc_address, http_address),
                                                    mesh.loop).result()
        finally:
            mesh.stop()
    print(f"\nmedians over {args.runs} runs of {args.requests} requests, {args.max_tokens} tokens each "
          "(kserve/openai: tok/s higher is better, TTFT lower is better)")
    print(table(["concurrency", "path", "output tok/s", "TTFT p50 ms"], rows))


if __name__ == "__main__":
    main()
