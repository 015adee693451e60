"""Chaos run: steady streaming load on a local mesh while a worker is killed (or hung) and restarted
every ~20 s. Reports requests sent / failed / migrated, how fast the router took the faulty worker out
of routing (measured from outside: the fault's signal to ListWorkers no longer listing it healthy),
and the throughput dip around each fault.

Usage: python benchmarks/chaos.py [--duration-s 150] [--fault-every-s 20] [--workers 2] [--concurrency 8]
       [--faults kill,hang] [--out chaos.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stats import median, percentile, table  # noqa: E402

from tandem.local_mesh import LocalMesh  # noqa: E402
from tandem.models import resolve_model  # noqa: E402
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"
TOPICS = ["the sea", "a red fox", "an old library", "a quiet train", "the first snow", "a lighthouse",
          "a lost key", "autumn leaves", "a clockmaker", "a river stone", "city lights", "a paper boat"]


@dataclass
class Fault:
    kind: str  # kill | hang
    worker: int
    at_s: float  # since the run started
    detected_after_s: float | None = None  # signal -> the router no longer lists it healthy
    closed_after_s: float | None = None  # kill: signal -> the kernel closed the worker's sockets
    rejoined_after_s: float | None = None


@dataclass
class Load:
    num_sent: int = 0
    num_ok: int = 0
    errors: list[str] = field(default_factory=list)
    token_times_s: list[float] = field(default_factory=list)  # arrival of every streamed chunk


async def client_loop(client: httpx.AsyncClient, index: int, load: Load, started: float, stop: asyncio.Event,
                      max_tokens: int) -> None:
    i = 0
    while not stop.is_set():
        body = {"model": MODEL, "prompt": f"Write about {TOPICS[(index + i) % len(TOPICS)]} ({index}.{i}).",
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
        i += 1
        load.num_sent += 1
        try:
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    load.errors.append(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
                    continue
                finished = False
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        load.errors.append(event["error"]["message"][:300])
                        break
                    load.token_times_s.append(time.monotonic() - started)
                    finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
                if finished:
                    load.num_ok += 1
                elif not load.errors or not load.errors[-1]:
                    load.errors.append("stream ended without a finish reason")
        except httpx.HTTPError as error:
            load.errors.append(f"{type(error).__name__}: {error}")


def watch_detection(mesh: LocalMesh, fault: Fault, fault_s: list[float], ready: threading.Event) -> None:
    """Poll the router's ListWorkers on one channel (a thread, so the client loops cannot delay it)
    until the worker is out of routing; ``fault_s`` holds the signal's time once it is sent."""
    worker_id = f"decode-{fault.worker}"
    with grpc.insecure_channel(mesh.router_address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)  # connected before the fault
        ready.set()
        while not fault_s or time.monotonic() - fault_s[0] < 30:
            reply = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=1)
            if fault_s and not any(w.info.worker_id == worker_id and w.healthy for w in reply.workers):
                fault.detected_after_s = time.monotonic() - fault_s[0]
                return
            time.sleep(0.001)


async def chaos_loop(mesh: LocalMesh, faults: list[Fault], kinds: list[str], every_s: float, started: float,
                     stop: asyncio.Event, hang_s: float) -> None:
    """A fault at every multiple of ``every_s`` (later if the last victim has not rejoined yet)."""
    n = 0
    while True:
        next_s = started + (n + 1) * every_s
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, next_s - time.monotonic()))
        except TimeoutError:
            pass
        if stop.is_set():
            return
        fault = Fault(kinds[n % len(kinds)], n % len(mesh.workers), time.monotonic() - started)
        n += 1
        faults.append(fault)
        await inject(mesh, fault, hang_s)
        print(f"  {fault.at_s:6.1f} s  {fault.kind} decode-{fault.worker}: out of routing after "
              f"{(fault.detected_after_s or float('nan')) * 1000:.1f} ms (its sockets closed after "
              f"{(fault.closed_after_s or float('nan')) * 1000:.1f} ms); back after {fault.rejoined_after_s} s",
              flush=True)


# The HTTP/2 connection preface and an empty SETTINGS frame.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def wait_closed(sock: socket.socket, closed_s: list[float]) -> None:
    """Read (and drop) what the server sends until its side of the connection closes."""
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    closed_s.append(time.monotonic())


async def inject(mesh: LocalMesh, fault: Fault, hang_s: float) -> None:
    child = mesh.workers[fault.worker]
    # An idle TCP connection to the worker: its EOF is the moment the kernel closes the dead process's
    # sockets, after tearing down its memory. Nobody can see the death sooner.
    host, port = mesh.worker_address(fault.worker).split(":")
    probe = socket.create_connection((host, int(port)))
    probe.sendall(_HTTP2_PREFACE)  # a valid HTTP/2 client, or the server hangs up on it
    closed_s: list[float] = []
    closed = threading.Thread(target=wait_closed, args=(probe, closed_s))
    closed.start()
    signalled_s: list[float] = []
    ready = threading.Event()  # set once the watcher is connected to the router
    watcher = threading.Thread(target=watch_detection, args=(mesh, fault, signalled_s, ready))
    watcher.start()
    await asyncio.to_thread(ready.wait, 5)
    child.send(signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)
    fault_s = time.monotonic()
    signalled_s.append(fault_s)
    await asyncio.to_thread(watcher.join)
    if fault.kind == "kill":
        await asyncio.to_thread(closed.join, 30)
        fault.closed_after_s = closed_s[0] - fault_s if closed_s else None
    if fault.kind == "hang":  # a hung worker is replaced after a while, as an orchestrator would
        await asyncio.sleep(max(0.0, hang_s - (time.monotonic() - fault_s)))
    child.restart()  # on the main thread: children die with the thread that spawned them
    await asyncio.to_thread(closed.join, 30)
    probe.close()
    try:
        fault.rejoined_after_s = round(
            await asyncio.to_thread(mesh.wait_worker_healthy, f"decode-{fault.worker}", 120), 1)
    except RuntimeError as error:
        print(f"  restart failed: {error}", flush=True)


def scrape(url: str) -> dict[str, float]:
    """Counter and histogram totals by full sample name with labels."""
    samples: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


def sum_matching(samples: dict[str, float], prefix: str, contains: str = "") -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix) and contains in k)


def throughput(load: Load, duration_s: float, faults: list[Fault], window_s: float) -> dict[str, object]:
    """Tokens/s in 1 s bins; the baseline is their median away from faults (after a 5 s ramp-up), and
    each fault's dip is its window's mean against it."""
    bins = [0] * (int(duration_s) + 1)
    for t in load.token_times_s:
        if t < len(bins):
            bins[int(t)] += 1
    near = {s for f in faults for s in range(int(f.at_s), int(f.at_s + window_s) + 1)}
    baseline = median([b for s, b in enumerate(bins[5:-1], 5) if s not in near]) or float("nan")
    per_fault = []
    for fault in faults:
        window = bins[int(fault.at_s):int(fault.at_s + window_s)] or [0]
        per_fault.append({"at_s": round(fault.at_s, 1), "kind": fault.kind,
                          "mean_tokens_per_s": sum(window) / len(window), "worst_second_tokens_per_s": min(window),
                          "dip_pct": round(100 * (1 - sum(window) / len(window) / baseline), 1)})
    return {"baseline_tokens_per_s": baseline, "window_s": window_s, "per_fault": per_fault}


async def run(args: argparse.Namespace) -> dict[str, object]:
    mesh = LocalMesh(args.workers, model_path=resolve_model(None), num_threads=args.threads,
                     frontend_args=["--stall-timeout-s", str(args.stall_timeout_s)])
    print(f"starting a mesh with {args.workers} workers ...", flush=True)
    mesh.start()
    try:
        before = scrape(f"{mesh.http_url}/metrics")
        load, faults, stop = Load(), [], asyncio.Event()
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=mesh.http_url, timeout=300) as client:
            clients = [asyncio.create_task(client_loop(client, i, load, started, stop, args.max_tokens))
                       for i in range(args.concurrency)]
            chaos = asyncio.create_task(chaos_loop(mesh, faults, args.faults.split(","), args.fault_every_s,
                                                   started, stop, args.hang_s))
            await asyncio.sleep(args.duration_s)
            stop.set()
            await asyncio.gather(*clients, chaos)
        duration_s = time.monotonic() - started
        after = scrape(f"{mesh.http_url}/metrics")
        router = scrape(mesh.router_metrics_url)
    finally:
        mesh.stop()
    migrations = {reason: sum_matching(after, "tandem_frontend_migrations_total", f'reason="{reason}"')
                  - sum_matching(before, "tandem_frontend_migrations_total", f'reason="{reason}"')
                  for reason in ("unreachable", "stream_broken", "stalled", "worker_stalled")}
    detection = {kind: [f.detected_after_s for f in faults if f.kind == kind and f.detected_after_s is not None]
                 for kind in ("kill", "hang")}
    # Detection against the moment the kernel closed the dead process's sockets: negative when the
    # router saw the process exiting (same host) before its connections could tell.
    detection["kill_minus_sockets_closed"] = [f.detected_after_s - f.closed_after_s for f in faults
                                              if f.detected_after_s is not None and f.closed_after_s is not None]
    return {
        "duration_s": round(duration_s, 1), "workers": args.workers, "concurrency": args.concurrency,
        "requests_sent": load.num_sent, "requests_ok": load.num_ok, "requests_failed": len(load.errors),
        "in_flight_at_end": load.num_sent - load.num_ok - len(load.errors), "error_samples": load.errors[:5],
        "migrations": migrations, "faults": [asdict(f) for f in faults],
        "detection_ms": {kind: {"n": len(v), "p50": percentile(v, 50) * 1000, "p99": percentile(v, 99) * 1000}
                         for kind, v in detection.items()},
        "router_quarantines": {k.split('"')[1]: v for k, v in router.items()
                               if k.startswith("tandem_router_workers_quarantined_total{") and v},
        "throughput": throughput(load, duration_s, faults, args.window_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=150.0, help="length of the steady load")
    parser.add_argument("--fault-every-s", type=float, default=20.0, help="a fault every this many seconds")
    parser.add_argument("--faults", default="kill,hang", help="fault kinds, in turn: kill (SIGKILL), hang (SIGSTOP)")
    parser.add_argument("--hang-s", type=float, default=3.0, help="a hung worker is replaced after this long")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stall-timeout-s", type=float, default=2.0, help="the frontend's stall limit")
    parser.add_argument("--window-s", type=float, default=5.0, help="seconds after a fault counted as its dip")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    args = parser.parse_args()
    if any(kind not in ("kill", "hang") for kind in args.faults.split(",")):
        parser.error("--faults: kinds are kill and hang")
    report = asyncio.run(run(args))
    rows = [[kind, d["n"], d["p50"], d["p99"]] for kind, d in report["detection_ms"].items()]  # type: ignore[union-attr]
    print(json.dumps({k: v for k, v in report.items() if k not in ("faults", "detection_ms")}, indent=2))
    print(table(["fault", "n", "out of routing p50 ms", "p99 ms"], rows))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
