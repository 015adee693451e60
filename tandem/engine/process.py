"""An engine in a child process of its own, so its step thread shares no interpreter lock with the
worker's event loop and gRPC threads.

In one process, the step thread gives up the GIL at every torch op; when the worker's loop or
gRPC's threads want it (to hand the last step's tokens on), the step waits to take it back. On a
GPU, whose step is the host launching kernels from Python, that cost the mesh 4-5% a step at
concurrency 1, and none with the engine here (benchmarks/mesh_ab.py, H100). On a CPU the step's
2% cost stays either way: it does not come from the lock.
Here the child runs the engine beside a small event loop that only relays: requests and aborts come
in over one pipe, and each loop turn's outputs, with the forward passes' StepInfo and fresh stats,
go back as one message over another.

What crosses the boundary is the ``Engine`` protocol only: generate, abort, stats, healthy. The
disaggregation calls (KV reservations, reads and writes of the pool) and KV events are not carried,
so a worker with this engine prefills locally and is routed without KV events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from tandem import errors, lifecycle
from tandem.engine.config import EngineConfig
from tandem.engine.types import EngineRequest, EngineStats, FinishReason, RequestOutput, StepInfo
from tandem.telemetry.runtime import freeze_startup_objects

log = structlog.get_logger(__name__)

_STATS_INTERVAL_S = 0.05  # the child reports stats at least this often (queued requests show without a step)
_START_TIMEOUT_S = 600.0


@dataclass(slots=True)
class _Refusal:
    """A request the child's engine refused before its first output (InvalidRequest, ResourceExhausted)."""

    kind: str
    message: str
    field: str | None

    def error(self) -> Exception:
        error_class = getattr(errors, self.kind, None)
        if isinstance(error_class, type) and issubclass(error_class, errors.TandemError):
            return error_class(self.message, self.field)
        return RuntimeError(self.message)


class EngineProcess:
    """The ``Engine`` protocol, served by an engine built from ``config`` in a child process."""

    def __init__(self, config: EngineConfig, on_step: Callable[[StepInfo], None] | None = None) -> None:
        self.config = config
        self.model_name = ""
        self.max_model_len = config.max_model_len or 0
        self._on_step = on_step
        self._streams: dict[str, asyncio.Queue[RequestOutput | _Refusal]] = {}
        self._stats = EngineStats(num_kv_blocks_total=config.num_kv_blocks, block_size=config.block_size)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None
        self._outputs: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended = False  # the child exited or its pipe broke
        self._started = asyncio.Event()
        self._child_healthy = True
        self._stopping = False
        self.child_event_loop = ""  # the child's event loop module ("uvloop", "asyncio"), once it started

    async def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        commands_child, commands = context.Pipe(duplex=False)
        outputs, outputs_child = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, args=(self.config, commands_child, outputs_child),
                                        name="tandem-engine-core", daemon=True)
        self._process.start()
        commands_child.close()
        outputs_child.close()
        self._commands, self._outputs = commands, outputs
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(outputs.fileno(), self._readable)
        try:
            await asyncio.wait_for(self._started.wait(), _START_TIMEOUT_S)
        except TimeoutError:
            await self.shutdown()
            raise RuntimeError(f"the engine process did not start within {_START_TIMEOUT_S:.0f} s") from None
        if self._ended:
            await self.shutdown()
            raise RuntimeError(f"the engine process failed to start (exit code {self._process.exitcode})")
        log.info("engine process started", pid=self._process.pid, model=self.model_name)

    async def shutdown(self) -> None:
        if self._process is None:
            return
        self._stopping = True
        self._send(("shutdown",))
        await asyncio.to_thread(self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
            await asyncio.to_thread(self._process.join, 5)
        self._end("the engine process stopped")
        for connection in (self._commands, self._outputs):
            if connection is not None:
                connection.close()

    def healthy(self) -> bool:
        return (self._process is not None and self._process.is_alive() and not self._ended
                and self._child_healthy)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if not self.healthy():
            raise RuntimeError("the engine is not running")
        rid = request.request_id
        updates: asyncio.Queue[RequestOutput | _Refusal] = asyncio.Queue()
        self._streams[rid] = updates
        self._send(("add", request))
        finished = False
        try:
            while not finished:
                item = await updates.get()
                if isinstance(item, _Refusal):
                    finished = True  # the child holds nothing for it
                    raise item.error()
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:  # the consumer went away: the child aborts it and frees its blocks
                self._send(("abort", rid))

    async def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    # -- the pipes -------------------------------------------------------------------------------

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._commands is None or self._ended:
            return
        try:
            self._commands.send(message)
        except (OSError, ValueError):  # the child is gone; its streams fail when its pipe ends
            self._end("the engine process exited")

    def _readable(self) -> None:
        assert self._outputs is not None
        try:
            while self._outputs.poll():
                self._dispatch(self._outputs.recv())
        except (EOFError, OSError):
            self._end(f"the engine process exited (exit code {self._process.exitcode if self._process else None})")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "batch":
            _, items, steps, stats, healthy = message
            self._stats, self._child_healthy = stats, healthy
            if self._on_step is not None:
                for step in steps:
                    self._on_step(step)
            for rid, item in items:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.put_nowait(item)
        elif kind == "ready":
            _, self.model_name, self.max_model_len, self.child_event_loop = message
            self._started.set()

    def _end(self, why: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._loop is not None and self._outputs is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._outputs.fileno())
        self._started.set()
        self._fail_streams(why)
        if not self._stopping:
            log.error("engine process ended", why=why)

    def _fail_streams(self, why: str) -> None:
        for rid, stream in list(self._streams.items()):
            stream.put_nowait(RequestOutput(rid, [], "", FinishReason.ERROR, error=why))


# -- the child ---------------------------------------------------------------------------------


def _child_main(config: EngineConfig, commands: Connection, outputs: Connection) -> None:
    """The engine process: an HFEngine and a loop that relays between it and the pipes."""
    from tandem.telemetry.logging import configure_logging

    configure_logging("engine-core")
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write("tandem-engine")  # what ps -o comm and top show (the command line is Python's spawn)
    lifecycle.run(_ChildRelay(config, commands, outputs).run())  # the event loop every Tandem process runs


class _ChildRelay:
    def __init__(self, config: EngineConfig, commands: Connection, outputs: Connection) -> None:
        self._config = config
        self._commands = commands
        self._outputs = outputs
        self._steps: list[StepInfo] = []
        self._steps_lock = threading.Lock()
        self._items: list[tuple[str, RequestOutput | _Refusal]] = []
        self._flush_scheduled = False
        self._sent: tuple[EngineStats, bool] | None = None  # the stats and health last sent
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._done = asyncio.Event()

    def _note_step(self, info: StepInfo) -> None:  # on the step thread
        with self._steps_lock:
            self._steps.append(info)

    async def run(self) -> None:
        from tandem.engine.factory import create_engine

        self._engine = create_engine(dataclasses.replace(self._config, own_process=False), on_step=self._note_step)
        await self._engine.start()
        freeze_startup_objects()  # a full collection would stop the step thread (see tandem.telemetry.runtime)
        self._outputs.send(("ready", self._engine.model_name, self._engine.max_model_len,
                            type(asyncio.get_running_loop()).__module__.split(".")[0]))
        loop = asyncio.get_running_loop()
        loop.add_reader(self._commands.fileno(), self._readable)
        ticker = asyncio.create_task(self._tick())
        try:
            await self._done.wait()
        finally:
            ticker.cancel()
            loop.remove_reader(self._commands.fileno())
            for task in list(self._tasks.values()):
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self._engine.shutdown()
            with contextlib.suppress(OSError):
                self._flush()

    def _readable(self) -> None:
        try:
            while self._commands.poll():
                self._apply(self._commands.recv())
        except (EOFError, OSError):  # the worker is gone: stop
            self._done.set()

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "add":
            request: EngineRequest = message[1]
            self._tasks[request.request_id] = asyncio.create_task(self._serve(request))
        elif kind == "abort":
            task = self._tasks.pop(message[1], None)
            if task is not None:
                task.cancel()  # closes engine.generate: the engine aborts it
        elif kind == "shutdown":
            self._done.set()

    async def _serve(self, request: EngineRequest) -> None:
        rid = request.request_id
        try:
            async for output in self._engine.generate(request):
                self._queue(rid, output)
        except errors.TandemError as error:
            self._queue(rid, _Refusal(type(error).__name__, error.message, error.field))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the worker sees it as the request's error
            self._queue(rid, RequestOutput(rid, [], "", FinishReason.ERROR, error=f"engine failure: {error}"))
        finally:
            if self._tasks.get(rid) is asyncio.current_task():
                del self._tasks[rid]

    def _queue(self, rid: str, item: RequestOutput | _Refusal) -> None:
        self._items.append((rid, item))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        with self._steps_lock:
            steps, self._steps = self._steps, []
        items, self._items = self._items, []
        state = (self._engine.stats(), self._engine.healthy())
        if items or steps or state != self._sent:
            self._outputs.send(("batch", items, steps, *state))
            self._sent = state

    async def _tick(self) -> None:
        """Stats that changed without an output (a request queued, blocks freed) go out within the interval."""
        while True:
            await asyncio.sleep(_STATS_INTERVAL_S)
            if not self._flush_scheduled:
                self._flush()
