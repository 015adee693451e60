"""``python -m services.prefill``: parse flags, configure logging, serve until SIGTERM or SIGINT, drain."""

from __future__ import annotations

import sys

from services.prefill.config import PrefillConfig, parse_args
from services.prefill.server import serve
from tandem import lifecycle
from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
from tandem.lifecycle import serve_until_signal
from tandem.telemetry.logging import configure_logging


async def run(config: PrefillConfig) -> bool:
    return await serve_until_signal(lambda: serve(config))


def main() -> None:
    configure_logging("prefill")
    keep_large_buffers_in_heap()
    config = parse_args()
    try:
        served = lifecycle.run(run(config))
    except (OSError, ValueError) as error:
        print(f"prefill: {error}", file=sys.stderr)
        sys.exit(1)
    if not served:  # the engine died: exit so that a supervisor starts a new worker
        print("prefill: the engine failed; exiting with code 1", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
