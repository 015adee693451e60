"""Start real meshes with `tandem up` (real processes, dynamic ports) and tear them down by PID."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from tandem import procs


def free_port_run(count: int) -> int:
    """A base port such that base..base+count-1 are all free right now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports")


@dataclass
class Mesh:
    proc: subprocess.Popen[bytes]
    http_url: str
    grpc_address: str
    worker_base_port: int
    num_workers: int

    def worker_metrics_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.worker_base_port + 2 * index + 1}/metrics"

    def worker_address(self, index: int) -> str:
        return f"127.0.0.1:{self.worker_base_port + 2 * index}"

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        children = self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            for child in children:  # never leave processes behind, even when a test fails
                if child.is_running():
                    child.kill()
        return code


def start_mesh(num_workers: int = 1, *extra: str) -> Mesh:
    http_port, grpc_port = procs.free_port(), procs.free_port()
    base = free_port_run(2 * num_workers)
    command = [sys.executable, "-m", "tandem.cli", "up", "--decode-workers", str(num_workers),
               "--port", str(http_port), "--grpc-port", str(grpc_port), "--router-port", "0",
               "--worker-base-port", str(base), "--num-threads", "1", "--num-kv-blocks", "512", *extra]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    mesh = Mesh(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", base, num_workers)
    deadline = time.monotonic() + 300
    while not procs.http_ok(f"{mesh.http_url}/health"):
        if proc.poll() is not None:
            raise RuntimeError(f"tandem up exited with {proc.returncode}")
        if time.monotonic() > deadline:
            mesh.stop(signal.SIGKILL)
            raise RuntimeError("the mesh did not become healthy")
        time.sleep(0.5)
    while not all(procs.grpc_serving(mesh.worker_address(i)) for i in range(num_workers)):
        time.sleep(0.25)
    return mesh


@pytest.fixture(scope="module")
def mesh(model_path) -> Iterator[Mesh]:  # type: ignore[no-untyped-def]
    """One decode worker: most end-to-end tests share it."""
    running = start_mesh(1)
    yield running
    running.stop()
