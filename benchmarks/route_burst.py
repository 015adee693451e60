"""Routing a burst: how long requests that arrive together wait for their Route answers.

Starts `tandem up` (router, one decode worker, frontend) and drives its router with the frontend's
own RouteClient from this process, the way the frontend routes each request. Each burst sends N
RouteRequests at once (the prompt of a short completion, hashed as the frontend hashes it) and
times every answer and the last one. Three ways alternate burst by burst, so drift cancels: one
RouteStream (what the frontend did before it opened several), up to MAX_STREAMS streams (what it
does now), and unary Route calls.
Usage: python benchmarks/route_burst.py [--burst 1 4 8] [--bursts 60]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median, percentile, table  # noqa: E402

WAYS = ("1 stream", "pool", "unary")


async def burst(client, stub, way: str, messages: list, timeout_s: float) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds from the burst's start to each answer."""
    started = time.perf_counter()

    async def one(message) -> float:  # type: ignore[no-untyped-def]
        if way == "unary":
            await stub.Route(message, timeout=timeout_s)
        else:
            await client.route(message, (), timeout_s)
        return time.perf_counter() - started

    return list(await asyncio.gather(*(one(m) for m in messages)))


def start_mesh(model_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`tandem up` with one decode worker, once it serves; the process and its router's port."""
    from tandem import procs

    port, router_port = procs.free_port(), procs.free_port()
    mesh = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", "--port", str(port),
                             "--grpc-port", str(procs.free_port()), "--router-port", str(router_port),
                             "--worker-base-port", str(procs.free_port()), "--num-threads", "1",
                             "--model", str(model_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not procs.http_ok(f"http://127.0.0.1:{port}/health"):
        if mesh.poll() is not None or time.monotonic() > deadline:
            mesh.kill()
            raise SystemExit("the mesh did not start")
        time.sleep(0.5)
    return mesh, router_port


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, nargs="+", default=[1, 4, 8], help="requests sent together")
    parser.add_argument("--bursts", type=int, default=60, help="bursts per way and size")
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause between bursts")
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: SmolLM2-135M)")
    args = parser.parse_args()

    import grpc
    from transformers import AutoTokenizer

    from services.frontend import route_client
    from services.frontend.pipeline import KV_BLOCK_SIZE
    from tandem.grpc_server import CHANNEL_OPTIONS
    from tandem.kv.hashing import hash_blocks
    from tandem.models import resolve_model, served_model_name
    from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

    model_path = args.model or resolve_model(None)
    model = served_model_name(model_path)
    mesh, router_port = start_mesh(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}", options=CHANNEL_OPTIONS)
        stub = router_pb2_grpc.RouterServiceStub(channel)
        single = route_client.RouteClient(stub, f"127.0.0.1:{router_port}", max_streams=1)
        pooled = route_client.RouteClient(stub, f"127.0.0.1:{router_port}")
        counter = iter(range(10**9))

        def messages(n: int) -> list[router_pb2.RouteRequest]:
            out = []
            for _ in range(n):
                ids = tokenizer.encode(f"Write a short story about the sea (variant {next(counter)}).")
                out.append(router_pb2.RouteRequest(request_id=f"bench-{next(counter)}", model=model, token_ids=ids,
                                                   block_hashes=hash_blocks(ids, KV_BLOCK_SIZE),
                                                   block_size=KV_BLOCK_SIZE))
            return out

        rows = []
        for size in args.burst:
            samples: dict[str, tuple[list[float], list[float]]] = {way: ([], []) for way in WAYS}
            for i in range(args.bursts + 2):  # the first two warm every way up
                for way in WAYS[i % 3:] + WAYS[:i % 3]:  # rotate which way goes first
                    client = single if way == "1 stream" else pooled
                    times = await burst(client, stub, way, messages(size), 5.0)
                    if i >= 2:
                        samples[way][0].extend(times)
                        samples[way][1].append(max(times))
                    await asyncio.sleep(args.gap_ms / 1e3)
            base = median(samples["1 stream"][1])
            for way in WAYS:
                each, last = samples[way]
                rows.append([size, way, median(each) * 1e3, percentile(each, 99) * 1e3, median(last) * 1e3,
                             median(last) / base])
        await single.close()
        await pooled.close()
        await channel.close()
    finally:
        mesh.terminate()
        mesh.wait(60)
    print(f"\n{args.bursts} bursts per size and way, {args.gap_ms:g} ms apart, ways alternating; "
          f"pool = up to {route_client.MAX_STREAMS} RouteStreams\n")
    print(table(["burst", "way", "answer p50 ms", "answer p99 ms", "last answer p50 ms", "last / 1 stream"], rows))


if __name__ == "__main__":
    asyncio.run(main())
