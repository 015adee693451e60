"""The `tandem` command: `tandem up` runs a whole local mesh; `tandem <role>` runs one service."""

from __future__ import annotations

import argparse
import functools
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from tandem import procs
from tandem.engine.config import on_off

ROLES = ("frontend", "router", "decode", "prefill")


# A worker that exits is started again after RESTART_FIRST_DELAY_S; one that exits again within
# RESTART_STABLE_S of its start waits twice as long as the last time, up to RESTART_MAX_DELAY_S.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
RESTART_STABLE_S = 60.0


def restart_delay(previous_s: float, lived_s: float) -> float:
    """How long to wait before starting again a worker that ran ``lived_s`` and waited ``previous_s``
    (0: never) before its last start."""
    if not previous_s or lived_s >= RESTART_STABLE_S:
        return RESTART_FIRST_DELAY_S
    return min(2 * previous_s, RESTART_MAX_DELAY_S)


@dataclass
class _Restartable:
    """One worker of a mesh that ``WorkerRestarts`` starts again: how, and when it last started."""

    name: str
    spawn: Callable[[], subprocess.Popen[bytes]]
    started_s: float
    delay_s: float = 0.0  # what it waited before its last start (0: never restarted)
    due_s: float | None = None  # when it starts again, while it is down


class WorkerRestarts:
    """Starts each worker of a mesh again when it exits (killed, out of memory, its engine failed)."""

    def __init__(self, mesh: Mesh, spawners: list[Callable[[], subprocess.Popen[bytes]]], names: list[str]) -> None:
        self.mesh = mesh
        now = time.monotonic()
        self._workers = [_Restartable(name, spawn, now) for name, spawn in zip(names, spawners, strict=True)]

    def poll(self) -> None:
        now = time.monotonic()
        for i, (proc, worker) in enumerate(zip(self.mesh.workers, self._workers, strict=True)):
            if worker.due_s is None and proc.poll() is not None:
                worker.delay_s = restart_delay(worker.delay_s, now - worker.started_s)
                worker.due_s = now + worker.delay_s
                print(f"tandem: {worker.name} (pid {proc.pid}) exited with code {proc.returncode}; "
                      f"starting it again in {worker.delay_s:.0f} s", file=sys.stderr, flush=True)
            elif worker.due_s is not None and now >= worker.due_s:
                self.mesh.workers[i] = worker.spawn()
                worker.started_s, worker.due_s = now, None
                print(f"tandem: {worker.name} started again (pid {self.mesh.workers[i].pid})",
                      file=sys.stderr, flush=True)


@dataclass
class Mesh:
    """The child processes of one `tandem up`, in start order."""

    router: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    frontend: subprocess.Popen[bytes] | None = None

    def all(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.router, *self.workers, self.frontend] if p is not None]

    def stop(self) -> None:
        # Frontend first so no new request arrives, router last so workers can deregister.
        procs.stop_all([p for p in [self.frontend, *self.workers, self.router] if p is not None])


def _up_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="tandem up", description="Run router, workers and frontend locally.")
    parser.add_argument("--decode-workers", type=int, default=int(env("TANDEM_DECODE_WORKERS", "1")))
    parser.add_argument("--prefill-workers", type=int, default=int(env("TANDEM_PREFILL_WORKERS", "0")),
                        help="dedicated prefill workers (0: decode workers prefill every prompt)")
    parser.add_argument("--remote-prefill-threshold", type=int, default=None,
                        help="router: uncached prompt tokens from which prefill goes to a prefill worker")
    parser.add_argument("--enforce-disagg", action="store_true",
                        help="router: fail rather than prefill on a decode worker when no prefill worker can")
    parser.add_argument("--kv-transport", default=env("TANDEM_KV_TRANSPORT", "auto"), choices=["auto", "grpc", "shm"],
                        help="how decode workers pull KV (auto: shared memory on one host)")
    parser.add_argument("--kv-processes", type=int, default=int(env("TANDEM_KV_PROCESSES", "0")),
                        help="gRPC KV transfers: exporter processes per prefill worker and pull helper processes per "
                             "decode worker (pays on many-core hosts, for transfers between hosts or with "
                             "--kv-transport grpc; 0: each worker moves its own)")
    parser.add_argument("--engine", default=env("TANDEM_ENGINE", "hf"), choices=["hf"])
    parser.add_argument("--model", default=env("TANDEM_MODEL", ""),
                        help="local Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default=env("TANDEM_HOST", "127.0.0.1"), help="interface the frontend binds")
    parser.add_argument("--port", type=int, default=int(env("TANDEM_PORT", "8000")), help="frontend HTTP port")
    parser.add_argument("--grpc-port", type=int, default=int(env("TANDEM_GRPC_PORT", "8001")),
                        help="frontend gRPC port (native API, KServe v2)")
    parser.add_argument("--router-port", type=int, default=int(env("TANDEM_ROUTER_PORT", "9100")),
                        help="router gRPC port; 0 picks a free one")
    parser.add_argument("--worker-base-port", type=int, default=int(env("TANDEM_WORKER_BASE_PORT", "9200")),
                        help="worker i (decode workers first, then prefill) serves gRPC on BASE+2i and metrics "
                        "on BASE+2i+1; 0 picks free ports")
    parser.add_argument("--policy", default=env("TANDEM_ROUTER_POLICY", "least-loaded"))
    parser.add_argument("--device", default=env("TANDEM_DEVICE", "cpu"), help="workers' torch device (cpu, cuda)")
    parser.add_argument("--engine-process", nargs="?", const="on", type=_engine_process_setting,
                        default=env("TANDEM_ENGINE_PROCESS", "off"),
                        help="on: each decode worker runs its engine in a child process, apart from its gRPC threads "
                             "(no KV from prefill workers, no KV events); auto: on for a GPU --device when nothing "
                             "here needs the pool in the worker; off (default)")
    parser.add_argument("--restart-workers", type=on_off, default=on_off(env("TANDEM_RESTART_WORKERS", "on")),
                        help="start a worker again when it exits (after 1 s, twice as long each time it exits "
                             "again within a minute, up to 30 s); 0 leaves it down")
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--startup-timeout-s", type=float, default=float(env("TANDEM_STARTUP_TIMEOUT_S", "600")))
    return parser


def _engine_process_setting(text: str) -> str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "on" if on_off(text) else "off"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}") from None


def engine_process_wanted(args: argparse.Namespace) -> bool:
    """Whether decode workers run their engine in a child process (``--engine-process``).

    auto: on a GPU, where the step is the host launching kernels from Python and shares the
    interpreter lock with the worker's event loop and gRPC threads; not on a CPU, where it changes
    nothing measurable; and never with what needs the KV pool or its events in the worker (prefill
    workers, pull helpers, the kv policy). Not the default: on an H100 it took the mesh's step cost
    at concurrency 1 from 4.5% to none one day (mesh_ab, 10 triples) and added 6% another (6 triples).
    """
    needs_pool = bool(args.prefill_workers or args.kv_processes or args.policy == "kv")
    if args.engine_process == "on" and needs_pool:
        raise SystemExit("tandem up: --engine-process keeps the KV pool in the engine's own process, so it does not "
                         "go with --prefill-workers, --kv-processes or --policy kv (which need the pool or its "
                         "events in the worker)")
    if args.engine_process == "auto":
        return not needs_pool and not str(args.device).startswith("cpu")
    return bool(args.engine_process == "on")


def _role(proc: subprocess.Popen[bytes]) -> str:
    """The ``services.<role>`` module a child runs, for messages."""
    args = proc.args if isinstance(proc.args, list) else [proc.args]
    return next((str(a) for a in args if str(a).startswith("services.")), str(args[0]))


def _port(requested: int) -> int:
    return requested if requested else procs.free_port()


def _wait_ready(mesh: Mesh, checks: list[tuple[str, object]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(checks)
    while pending:
        for proc in mesh.all():
            if proc.poll() is not None:
                raise RuntimeError(f"{_role(proc)} exited with code {proc.returncode} during start-up")
        pending = [(name, check) for name, check in pending if not check()]  # type: ignore[operator]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not SERVING after {timeout_s:.0f} s: {', '.join(n for n, _ in pending)}")
        time.sleep(0.25)


def up(argv: list[str]) -> int:
    args = _up_parser().parse_args(argv)
    if args.decode_workers < 1:
        raise SystemExit("tandem up: --decode-workers must be at least 1")
    if args.prefill_workers < 0:
        raise SystemExit("tandem up: --prefill-workers must be at least 0")
    if not 0 <= args.kv_processes <= 32:
        raise SystemExit("tandem up: --kv-processes must be in [0, 32]")
    engine_process = engine_process_wanted(args)
    from tandem.models import resolve_model

    try:
        model_path = resolve_model(args.model or None)  # convert once here, not in every child
    except FileNotFoundError as exc:
        raise SystemExit(f"tandem up: {exc}") from None
    roles = ["decode"] * args.decode_workers + ["prefill"] * args.prefill_workers
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // len(roles))
    router_port = _port(args.router_port)
    router_address = f"127.0.0.1:{router_port}"
    mesh = Mesh()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        router_args = ["--host", "127.0.0.1", "--port", str(router_port), "--metrics-port", str(_port(0)),
                       "--policy", args.policy]
        if args.remote_prefill_threshold is not None:
            router_args += ["--remote-prefill-threshold", str(args.remote_prefill_threshold)]
        if args.enforce_disagg:
            router_args.append("--enforce-disagg")
        mesh.router = procs.spawn("router", router_args)
        worker_ports = []
        worker_names = []
        spawners: list[Callable[[], subprocess.Popen[bytes]]] = []
        for i, role in enumerate(roles):
            name = f"{role}-{roles[:i].count(role)}"
            base = args.worker_base_port
            port = base + 2 * i if base else procs.free_port()
            metrics_port = base + 2 * i + 1 if base else procs.free_port()
            worker_ports.append(port)
            worker_args = ["--model", str(model_path), "--engine", args.engine, "--host", "127.0.0.1",
                           "--port", str(port), "--metrics-port", str(metrics_port),
                           "--router-address", router_address, "--num-threads", str(threads),
                           "--worker-id", name, "--device", args.device]
            if role == "decode" or args.kv_transport == "grpc":  # prefill workers serve shm unless told grpc
                worker_args += ["--kv-transport", args.kv_transport]
            if args.kv_processes:
                flag = "--kv-pull-processes" if role == "decode" else "--kv-export-processes"
                worker_args += [flag, str(args.kv_processes)]
            if args.num_kv_blocks:
                worker_args += ["--num-kv-blocks", str(args.num_kv_blocks)]
            if args.max_num_seqs:
                worker_args += ["--max-num-seqs", str(args.max_num_seqs)]
            if role == "decode":  # always said, so an inherited TANDEM_ENGINE_PROCESS=auto never reaches a worker
                worker_args += ["--engine-process", "1" if engine_process else "0"]
            worker_names.append(name)
            mesh.workers.append(procs.spawn(role, worker_args))
            spawners.append(functools.partial(procs.spawn, role, worker_args))
        mesh.frontend = procs.spawn("frontend", [
            "--model", str(model_path), "--host", args.host, "--http-port", str(args.port),
            "--grpc-port", str(args.grpc_port), "--router-address", router_address])
        http = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        checks: list[tuple[str, object]] = [("router", lambda: procs.grpc_serving(router_address))]
        checks += [(name, lambda p=p: procs.grpc_serving(f"127.0.0.1:{p}"))
                   for name, p in zip(worker_names, worker_ports, strict=True)]
        checks.append(("frontend", lambda: procs.http_ok(f"{http}/health")))
        _wait_ready(mesh, checks, args.startup_timeout_s)
        _print_banner(http, args.grpc_port, router_address, worker_ports, model_path, engine_process)
        restarts = WorkerRestarts(mesh, spawners, worker_names) if args.restart_workers else None
        while not stopping:
            for proc in [mesh.router, mesh.frontend]:
                if proc is not None and proc.poll() is not None:
                    print(f"tandem: {_role(proc)} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            if restarts is not None:
                restarts.poll()
            else:
                for proc in mesh.workers:
                    if proc.returncode is None and proc.poll() is not None:
                        print(f"tandem: worker pid {proc.pid} exited with code {proc.returncode}", file=sys.stderr)
            time.sleep(0.2)
        print("tandem: stopping...", file=sys.stderr, flush=True)
        return 0
    except RuntimeError as exc:
        print(f"tandem up: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        mesh.stop()


def _print_banner(http: str, grpc_port: int, router: str, worker_ports: list[int], model_path: object,
                  engine_process: bool) -> None:
    from tandem.models import served_model_name

    name = served_model_name(model_path)  # type: ignore[arg-type]
    engines = "in a child process of each decode worker" if engine_process else "in each worker's process"
    print(f"""
Tandem is up: serving {name}
  OpenAI API    {http}/v1        (/health, /metrics)
  gRPC          127.0.0.1:{grpc_port}     (tandem.api.v1.GenerationService, KServe v2)
  router        {router}
  workers       {', '.join(f'127.0.0.1:{p}' for p in worker_ports)}
  engines       {engines} (--engine-process)

Try:
  curl {http}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 32}}'

Ctrl-C stops everything.
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: tandem {up|frontend|router|decode|prefill} [options]   (tandem COMMAND --help)"
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        return up(rest)
    if command in ROLES:
        sys.argv = [f"tandem {command}", *rest]
        runpy.run_module(f"services.{command}", run_name="__main__", alter_sys=True)
        return 0
    print(f"tandem: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
