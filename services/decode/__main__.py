"""``python -m services.decode``: parse flags, configure logging, serve until SIGTERM or SIGINT, drain."""

from __future__ import annotations

import asyncio
import os
import sys

from services.decode.config import DecodeConfig, parse_args
from services.decode.server import serve
from tandem.lifecycle import serve_until_signal
from tandem.telemetry.logging import configure_logging


async def run(config: DecodeConfig) -> None:
    await serve_until_signal(lambda: serve(config))


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
