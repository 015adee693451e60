"""Run one service until SIGTERM or SIGINT, then stop it: the `__main__` loop every role shares."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Protocol


class Stoppable(Protocol):
    async def stop(self) -> None:
        """Drain and stop; called once, after the first signal."""


async def serve_until_signal(start: Callable[[], Awaitable[Stoppable]],
                             on_signal: Callable[[], None] | None = None) -> None:
    """Start the service and wait for a signal; a signal during start-up cancels the start.

    Cancelling ``start`` (a model still loading, say) lets it unbind its ports on the way out.
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
        return
    service = starting.result()
    await stopped
    if on_signal is not None:
        on_signal()
    await service.stop()
