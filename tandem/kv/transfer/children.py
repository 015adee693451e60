"""A worker's helper processes for KV transfers: exporters (prefill) and pull helpers (decode).

One Python process moves at most ~1-2.7 GB/s through gRPC, because grpcio copies every message
under the interpreter lock; several processes that map the worker's shared KV pool share that
work. Each helper is ``python -m <module> ARGS`` (its role shows in ``ps``), serves gRPC on a port
it announces on its first line of standard output, and exits when its standard input reaches its
end: when the worker closes it, or dies (even by SIGKILL, the kernel closes the pipe), so none
outlives its worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog

from tandem import lifecycle
from tandem.engine.types import KVLayout
from tandem.kv.transfer.shared_pool import MappedPool, SharedPoolInfo
from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
from tandem.telemetry.logging import configure_logging

log = structlog.get_logger("kv.transfer")

_READY = "tandem-helper-port "
_TOKEN_ENV = "TANDEM_HELPER_TOKEN"
HELPER_TOKEN_HEADER = "x-tandem-helper-token"
_ROOT = str(Path(__file__).resolve().parents[3])  # the folder holding tandem/ and services/


def helper_token() -> str:
    """Helper side: the token its worker's calls carry (empty outside a helper)."""
    return os.environ.get(_TOKEN_ENV, "")


def token_matches(context: grpc.aio.ServicerContext) -> bool:
    """Helper side: the call carries this helper's token (its worker made it)."""
    given = dict(context.invocation_metadata() or ()).get(HELPER_TOKEN_HEADER, "")
    expected = helper_token()
    return bool(expected) and hmac.compare_digest(str(given), expected)


class HelperProcesses:
    """``count`` copies of one helper, started by ``start`` (their ports), stopped by ``close``."""

    def __init__(self, module: str, args: Sequence[str], count: int) -> None:
        self.module = module
        self._args = list(args)
        self._count = count
        self._procs: list[subprocess.Popen[bytes]] = []
        # Callers of a helper that listens on loopback show this (HELPER_TOKEN_HEADER); it travels in
        # the environment, which other users cannot read (/proc/PID/environ), not the command line.
        self.token = secrets.token_hex(16)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def alive(self, index: int) -> bool:
        return self._procs[index].poll() is None

    async def start(self, timeout_s: float = 60.0) -> list[int]:
        """Start the helpers and wait for their ports."""
        path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", _TOKEN_ENV: self.token}
        for _ in range(self._count):
            # No preexec_fn, so the child is spawned without forking this (large, threaded) process.
            self._procs.append(subprocess.Popen(  # noqa: ASYNC220 (milliseconds)
                [sys.executable, "-m", self.module, *self._args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=env))
        try:
            async with asyncio.timeout(timeout_s):
                return list(await asyncio.gather(*(asyncio.to_thread(_read_port, p) for p in self._procs)))
        except BaseException:
            await self.close()
            raise

    def kill(self, index: int) -> None:
        """Stop one helper at once (it did not stop when asked, or a test wants it gone)."""
        self._procs[index].kill()
        self._procs[index].wait()

    async def close(self, grace_s: float = 2.0) -> None:
        """Close their standard input (they exit), then kill those still running after ``grace_s``."""
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.to_thread(proc.wait, grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()


def _read_port(proc: subprocess.Popen[bytes]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    if not line.startswith(_READY):
        raise RuntimeError(f"helper process {proc.pid} exited before it served (exit status {proc.wait()})")
    return int(line[len(_READY):])


def helper_args(pool: SharedPoolInfo, layout: KVLayout, **settings: object) -> list[str]:
    """The command line a worker gives a helper: its pool, the pool's layout and settings, as one JSON argument."""
    spec = {**settings, "pool": [pool.segment, pool.segment_size, pool.k_offset, pool.v_offset, pool.num_slots],
            "layout": [layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype]}
    return ["--spec", json.dumps(spec)]


HelperServer = tuple[grpc.aio.Server, Callable[[], Awaitable[None]]]


def run_helper(name: str, serve: Callable[[MappedPool, dict[str, Any]], HelperServer], *, writable: bool,
               host: str = "127.0.0.1") -> None:
    """A helper's ``main``: parse ``--spec``, map the worker's pool, build the server with ``serve``
    (the server and what to close after it), bind a free port on ``host`` (the spec's ``host`` when
    given), announce it, and serve until the worker closes our standard input or sends SIGTERM.
    SIGINT is ignored: a Ctrl-C in the worker's terminal reaches the helpers too, and the worker
    stops them itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog=f"python -m {name}")
    parser.add_argument("--spec", required=True, help="JSON from helper_args()")
    spec = json.loads(parser.parse_args().spec)
    configure_logging(name.rsplit(".", 1)[-1].replace("_", "-"))
    keep_large_buffers_in_heap()

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)

        def watch() -> None:  # the worker closed our standard input, or died
            with contextlib.suppress(OSError):
                while os.read(0, 4096):  # the raw descriptor: no buffer lock held at interpreter exit
                    pass
            with contextlib.suppress(RuntimeError):  # the loop already ended (SIGTERM came first)
                loop.call_soon_threadsafe(stopped.set)

        threading.Thread(target=watch, name="worker-watch", daemon=True).start()
        segment, size, k_offset, v_offset, num_slots = spec["pool"]
        info = SharedPoolInfo(str(segment), int(size), int(k_offset), int(v_offset), int(num_slots))
        layers, heads, head_dim, block_size, dtype = spec["layout"]
        pool = MappedPool(str(spec["shm_dir"]), info, KVLayout(layers, heads, head_dim, block_size, dtype),
                          writable=writable)  # maps every page now, not during the first transfer
        server, close = serve(pool, spec)
        port = server.add_insecure_port(f"{spec.get('host', host)}:0")
        await server.start()
        sys.stdout.write(f"{_READY}{port}\n")
        sys.stdout.flush()
        os.dup2(2, 1)  # anything printed later goes to standard error: nobody reads the pipe now
        log.info("helper serving", helper=name, port=port, pool=info.segment)
        await stopped.wait()
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second stop signal (the worker died too) just ends us
        await server.stop(0.5)
        await close()
        pool.close()

    try:
        lifecycle.run(main())
    except (OSError, ValueError) as error:
        print(f"{name}: {error}", file=sys.stderr)
        sys.exit(1)
