"""A local mesh (router, decode workers, frontend) as child processes on fixed ports, each of which can
be signalled, killed and restarted alone with the same arguments: fault tests and the chaos benchmark.

``tandem up`` is the way to run a mesh; this is the way to break one on purpose.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tandem import procs
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc


@dataclass
class Child:
    """One service process; ``restart`` starts a new one with the same role, arguments and ports."""

    role: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Call from the main thread: on Linux the child dies with the thread that spawned it
        (PR_SET_PDEATHSIG), so one started from a short-lived thread would be stopped with it."""
        self.proc = procs.spawn(self.role, self.args, self.env)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap, so the port is free for a restart."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def restart(self) -> None:
        self.kill()
        self.start()


class LocalMesh:
    """Router, ``num_workers`` decode workers and a frontend on ports chosen at construction."""

    def __init__(self, num_workers: int, *, model_path: Path, num_kv_blocks: int = 512, num_threads: int = 1,
                 router_args: Sequence[str] = (), worker_args: Sequence[str] = (),
                 frontend_args: Sequence[str] = ()) -> None:
        env = {"OMP_NUM_THREADS": str(num_threads), "TOKENIZERS_PARALLELISM": "false"}
        self._env = env
        self._worker_flags = ["--model", str(model_path), "--num-threads", str(num_threads),
                              "--num-kv-blocks", str(num_kv_blocks), *worker_args]
        self.router_port = procs.free_port()
        self.router_address = f"127.0.0.1:{self.router_port}"
        self.http_port, self.grpc_port = procs.free_port(), procs.free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        router_metrics_port = procs.free_port()
        self.router_metrics_url = f"http://127.0.0.1:{router_metrics_port}/metrics"
        self.router = Child("router", ["--host", "127.0.0.1", "--port", str(self.router_port),
                                       "--metrics-port", str(router_metrics_port), *router_args], env)
        self.worker_ports = [(procs.free_port(), procs.free_port()) for _ in range(num_workers)]
        self.workers = [self._worker_child(i) for i in range(num_workers)]
        self.frontend = Child("frontend", [
            "--model", str(model_path), "--host", "127.0.0.1", "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port), "--router-address", self.router_address, *frontend_args], env)

    def _worker_child(self, index: int) -> Child:
        port, metrics_port = self.worker_ports[index]
        return Child("decode", ["--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
                                "--router-address", self.router_address, "--worker-id", f"decode-{index}",
                                *self._worker_flags], self._env)

    def children(self) -> list[Child]:
        return [self.router, *self.workers, self.frontend]

    def worker_address(self, index: int) -> str:
        return f"127.0.0.1:{self.worker_ports[index][0]}"

    def worker_metrics_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.worker_ports[index][1]}/metrics"

    def start(self, timeout_s: float = 300) -> None:
        for child in self.children():
            child.start()
        try:
            self.wait_ready(timeout_s, respawn_workers=3)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = 120, *, respawn_workers: int | None = None) -> None:
        """Until the frontend is healthy and every worker is registered and healthy at the router.

        With ``respawn_workers`` (start-up), a worker that exits meanwhile is started again on fresh
        ports, that many times in all, then it fails the start: a port ``free_port`` picked can be taken
        before the worker binds it (by another process, or an outgoing connection's ephemeral port).
        Without it, exited workers are left to the caller (a test may have killed one).
        """
        deadline = time.monotonic() + timeout_s
        while not (procs.http_ok(f"{self.http_url}/health")
                   and len(self.healthy_workers()) == len(self.workers)):
            for child in self.children():
                if child.proc is not None and child.proc.poll() is not None and child.role != "decode":
                    raise RuntimeError(f"{child.role} exited with {child.proc.returncode} during start-up")
            for index, worker in enumerate(self.workers):
                if respawn_workers is not None and worker.proc is not None and worker.proc.poll() is not None:
                    if not respawn_workers:
                        raise RuntimeError(f"decode-{index} exited with {worker.proc.returncode} during start-up")
                    respawn_workers -= 1
                    self.worker_ports[index] = (procs.free_port(), procs.free_port())
                    self.workers[index] = self._worker_child(index)
                    self.workers[index].start()
            if time.monotonic() > deadline:
                raise RuntimeError(f"mesh not ready after {timeout_s:.0f} s (healthy: {self.healthy_workers()})")
            time.sleep(0.2)

    def healthy_workers(self, timeout_s: float = 1.0) -> list[str]:
        """Worker ids the router would route to now; empty when the router does not answer."""
        return [status.info.worker_id for status in self.worker_statuses(timeout_s) if status.healthy]

    def worker_statuses(self, timeout_s: float = 1.0) -> list[router_pb2.WorkerStatus]:
        try:
            with grpc.insecure_channel(self.router_address) as channel:
                reply = router_pb2_grpc.RouterServiceStub(channel).ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return []
        return list(reply.workers)

    def wait_worker_healthy(self, worker_id: str, timeout_s: float = 120) -> float:
        """Seconds until the router routes to ``worker_id`` again."""
        started = time.monotonic()
        while worker_id not in self.healthy_workers():
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{worker_id} not healthy after {timeout_s:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - started

    def stop(self) -> None:
        """Frontend first (no new work), router last; SIGCONT first, in case a test left one stopped."""
        for child in self.children():
            child.send(signal.SIGCONT)
        live = [c.proc for c in (self.frontend, *self.workers, self.router) if c.proc is not None]
        procs.stop_all(live)
