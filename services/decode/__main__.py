"""``python -m services.decode``: parse flags, configure logging, serve until SIGTERM or SIGINT, drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from services.decode.config import DecodeConfig, parse_args
from services.decode.server import serve
from tandem.telemetry.logging import configure_logging


async def run(config: DecodeConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A signal while the model loads still stops cleanly: serve() is cancelled and unbinds.
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
    configure_logging("decode")
    # Back torch's large CPU buffers (KV pool, activations) with transparent huge pages before the
    # first allocation: a killed worker's memory is then torn down in milliseconds instead of ~0.1 ms
    # per MB, and the kernel closes its sockets - what tells the frontend and router it died - only after.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    config = parse_args()
    try:
        asyncio.run(run(config))
    except (OSError, ValueError) as error:  # port in use, bad model directory: one line, not a traceback
        print(f"decode: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
