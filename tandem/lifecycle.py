"""Run one service until SIGTERM or SIGINT, then stop it: the `__main__` loop every role shares."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from tandem.telemetry.runtime import freeze_startup_objects

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")


class Stoppable(Protocol):
    async def stop(self) -> None:
        """Drain and stop; called once, after the first signal."""


async def serve_until_signal(start: Callable[[], Awaitable[Stoppable]],
                             on_signal: Callable[[], None] | None = None) -> bool:
    """Start the service and wait for a signal; a signal during start-up cancels the start.

    Cancelling ``start`` (a model still loading, say) lets it unbind its ports on the way out. A
    service with a ``failed`` event (a worker whose engine died) is stopped when that is set, and
    this returns False: the process should then exit non-zero, so that whatever supervises it
    (``tandem up``, Kubernetes, docker-compose) starts a new one. True after a signal. Once started,
    the objects start-up made are frozen out of the garbage collector's full collections.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.ensure_future(start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return True
    service = starting.result()
    freeze_startup_objects()  # what start-up made lives as long as the process: no collection walks it again
    failed_event: asyncio.Event | None = getattr(service, "failed", None)
    failing = asyncio.ensure_future(failed_event.wait()) if failed_event is not None else None
    await asyncio.wait({stopped} if failing is None else {stopped, failing}, return_when=asyncio.FIRST_COMPLETED)
    failed = not stopped.done()
    for waiter in (stopped, failing):
        if waiter is not None and not waiter.done():
            waiter.cancel()
    if not failed and on_signal is not None:
        on_signal()
    await service.stop()
    return not failed


def event_loop_name() -> str:
    """The event loop every Tandem process runs: ``$TANDEM_EVENT_LOOP``, uvloop unless set otherwise."""
    name = os.environ.get("TANDEM_EVENT_LOOP", "uvloop").strip().lower() or "uvloop"
    if name not in EVENT_LOOPS:
        raise ValueError(f"TANDEM_EVENT_LOOP={name!r}: expected one of {', '.join(EVENT_LOOPS)}")
    return name


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``event_loop_name()`` names; ValueError names a bad setting.

    uvloop takes about 0.2 ms off each request's trip through a service on a 2-core host (the
    frontend takes a burst of requests that much faster each), and grpc.aio runs on it unchanged.
    """
    try:
        name = event_loop_name()
    except ValueError:
        main.close()  # never started: no "coroutine was never awaited" warning on top of the error
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
