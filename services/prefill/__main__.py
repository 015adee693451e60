"""``python -m services.prefill``: parse flags, configure logging, serve until SIGTERM or SIGINT, drain."""

from __future__ import annotations

import asyncio
import signal
import sys

from services.prefill.config import PrefillConfig, parse_args
from services.prefill.server import serve
from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
from tandem.telemetry.logging import configure_logging


async def run(config: PrefillConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.create_task(serve(config))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    worker = starting.result()
    await stopped
    await worker.stop()


def main() -> None:
    configure_logging("prefill")
    keep_large_buffers_in_heap()
    config = parse_args()
    try:
        asyncio.run(run(config))
    except (OSError, ValueError) as error:
        print(f"prefill: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
