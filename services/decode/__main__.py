"""``python -m services.decode``: parse flags, configure logging, serve until SIGTERM or SIGINT, drain."""

from __future__ import annotations

import sys

from services.decode.config import DecodeConfig, parse_args
from services.decode.server import serve
from tandem import lifecycle
from tandem.lifecycle import serve_until_signal
from tandem.telemetry.logging import configure_logging


async def run(config: DecodeConfig) -> bool:
    return await serve_until_signal(lambda: serve(config))


def main() -> None:
    configure_logging("decode")
    # The KV pool is in transparent huge pages (see tandem.engine.hf.model_runner), so a killed
    # worker's memory goes fast; torch's THP_MEM_ALLOC_ENABLE is left alone (it slowed every step).
    config = parse_args()
    try:
        served = lifecycle.run(run(config))
    except (OSError, ValueError) as error:  # port in use, bad model directory: one line, not a traceback
        print(f"decode: {error}", file=sys.stderr)
        sys.exit(1)
    if not served:  # the engine died: exit so that a supervisor starts a new worker
        print("decode: the engine failed; exiting with code 1", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
