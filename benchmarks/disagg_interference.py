"""Interference: steady decoding streams while long prompts keep arriving, aggregated vs disaggregated.

Two meshes with the same number of worker processes, run one after the other: aggregated (two
decode workers, each prefilling its own prompts) and disaggregated (one prefill worker, one decode
worker; prompts of at least --threshold uncached tokens are prefilled remotely). Reports the
streams' inter-token latency p50/p99 and the long prompts' time to first token, medians of --runs.
Usage: python benchmarks/disagg_interference.py [--streams 4] [--duration-s 30] [--runs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median, percentile, table  # noqa: E402

MODES = {
    "aggregated": ["--decode-workers", "2"],
    "disaggregated": ["--decode-workers", "1", "--prefill-workers", "1"],
}


@dataclass
class Workload:
    itl_s: list[float] = field(default_factory=list)  # gaps between the streams' tokens
    long_ttft_s: list[float] = field(default_factory=list)
    stream_tokens: int = 0
    wall_s: float = 0.0


def long_prompt(tokenizer, index: int, num_tokens: int) -> str:  # type: ignore[no-untyped-def]
    """A prompt of about ``num_tokens`` tokens that shares no cached prefix with any other."""
    words = " ".join(f"entry {index}-{i}: the tide log reads {i * 7 % 13} knots." for i in range(num_tokens // 8))
    ids = tokenizer(f"Document {index}. {words}")["input_ids"][:num_tokens]
    return str(tokenizer.decode(ids))


class ItlRecorder:
    """Called with each token's arrival time; records the gaps within one request."""

    def __init__(self, result: Workload) -> None:
        self._result = result
        self._last: float | None = None

    def __call__(self, now: float) -> None:
        if self._last is not None:
            self._result.itl_s.append(now - self._last)
        self._last = now
        self._result.stream_tokens += 1


async def stream_once(client, url: str, model: str, prompt: str, max_tokens: int,  # type: ignore[no-untyped-def]
                      on_token) -> None:  # type: ignore[no-untyped-def]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                on_token(time.perf_counter())


async def run_workload(url: str, model: str, tokenizer, args: argparse.Namespace,  # type: ignore[no-untyped-def]
                       counter: itertools.count) -> Workload:  # type: ignore[type-arg]
    import httpx

    result = Workload()
    stop_at = time.perf_counter() + args.duration_s

    async def stream(client: httpx.AsyncClient, index: int) -> None:
        while time.perf_counter() < stop_at:
            await stream_once(client, url, model, f"Stream {index}: write a long story about the sea.",
                              args.stream_tokens, ItlRecorder(result))

    async def long_request(client: httpx.AsyncClient, prompt: str) -> None:
        started = time.perf_counter()
        first: list[float] = []
        await stream_once(client, url, model, prompt, 4, lambda now: first.append(now))
        result.long_ttft_s.append(first[0] - started)

    async def arrivals(client: httpx.AsyncClient) -> None:
        pending = []
        await asyncio.sleep(args.long_every_s / 2)  # streams first
        while time.perf_counter() < stop_at:
            prompt = long_prompt(tokenizer, next(counter), args.long_tokens)
            pending.append(asyncio.create_task(long_request(client, prompt)))
            await asyncio.sleep(args.long_every_s)
        await asyncio.gather(*pending)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(arrivals(client), *(stream(client, i) for i in range(args.streams)))
    result.wall_s = time.perf_counter() - started
    return result


def start_mesh(mode: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    from tandem import procs

    port = procs.free_port()
    command = [sys.executable, "-m", "tandem.cli", "up", *MODES[mode], "--port", str(port),
               "--grpc-port", str(procs.free_port()), "--router-port", "0", "--worker-base-port", "0",
               "--num-threads", str(args.threads), "--remote-prefill-threshold", str(args.threshold),
               "--device", args.device]
    if args.model:
        command += ["--model", args.model]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while not procs.http_ok(f"{url}/health"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the {mode} mesh did not start")
        time.sleep(0.5)
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4, help="concurrent decoding streams")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream request (re-issued)")
    parser.add_argument("--long-tokens", type=int, default=1600, help="tokens of each long prompt")
    parser.add_argument("--long-every-s", type=float, default=3.0, help="seconds between long prompts")
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--threshold", type=int, default=1024, help="--remote-prefill-threshold (disaggregated)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="", help="model directory (default: the default model)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tandem.models import resolve_model, served_model_name

    model_path = Path(args.model) if args.model else resolve_model(None)
    model = served_model_name(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    counter = itertools.count()
    results: dict[str, list[Workload]] = {}
    for mode in MODES:
        proc, url = start_mesh(mode, args)
        try:
            warm = argparse.Namespace(**{**vars(args), "duration_s": min(8.0, args.duration_s), "streams": 1})
            asyncio.run(run_workload(url, model, tokenizer, warm, counter))  # warm-up: first calls, caches
            results[mode] = [asyncio.run(run_workload(url, model, tokenizer, args, counter)) for _ in range(args.runs)]
        finally:
            proc.terminate()
            proc.wait(120)
        print(f"  {mode} done", flush=True)

    def figures(runs: list[Workload]) -> list[float]:
        return [median([percentile(r.itl_s, 50) * 1e3 for r in runs]),
                median([percentile(r.itl_s, 99) * 1e3 for r in runs]),
                median([percentile(r.long_ttft_s, 50) * 1e3 for r in runs]),
                median([percentile(r.long_ttft_s, 99) * 1e3 for r in runs]),
                median([r.stream_tokens / r.wall_s for r in runs]),
                median([float(len(r.long_ttft_s)) for r in runs])]

    agg, dis = figures(results["aggregated"]), figures(results["disaggregated"])
    rows = [["aggregated (2 decode)", *agg], ["disaggregated (1 prefill + 1 decode)", *dis],
            ["disaggregated / aggregated", *(d / a if a else float("nan") for d, a in zip(dis, agg, strict=True))]]
    print(f"\n{args.streams} streams x {args.stream_tokens} tokens, a {args.long_tokens}-token prompt every "
          f"{args.long_every_s} s, {args.duration_s:.0f} s per run, {args.runs} runs (medians), {args.threads} "
          f"torch thread(s) per worker, device {args.device}, threshold {args.threshold}\n")
    print(table(["mesh", "ITL p50 ms", "ITL p99 ms", "long TTFT p50 ms", "long TTFT p99 ms", "stream tok/s",
                 "long prompts"], rows))


if __name__ == "__main__":
    main()
