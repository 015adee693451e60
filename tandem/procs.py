"""Child-process plumbing for `tandem up` and the end-to-end tests: ports, spawning, readiness."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_PR_SET_PDEATHSIG = 1


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now and that this process was not given before: a port
    handed out is not bound until its service starts, and the OS may offer it again meanwhile (the
    router and a worker once got the same one). Another process may still take it first."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            break
    _handed_out.add(port)
    return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if `tandem up` dies, even by SIGKILL, so nothing is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def spawn(role: str, args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``python -m services.<role> ARGS``: the role shows in ``ps`` output."""
    command = [sys.executable, "-m", f"services.{role}", *args]
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, preexec_fn=preexec)  # noqa: PLW1509


def grpc_serving(address: str, timeout_s: float = 1.0) -> bool:
    """True when the gRPC health service at ``address`` answers SERVING for the whole server."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout_s)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = 15.0) -> None:
    """SIGTERM every live child (in the order given), wait for the grace period, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
