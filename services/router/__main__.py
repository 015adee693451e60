"""``python -m services.router``: parse flags, configure logging, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

from services.router.config import RouterConfig, parse_args
from services.router.server import serve
from tandem import lifecycle
from tandem.lifecycle import serve_until_signal
from tandem.telemetry.logging import configure_logging


async def run(config: RouterConfig) -> None:
    await serve_until_signal(lambda: serve(config))


def main() -> None:
    configure_logging("router")
    config = parse_args()
    try:
        lifecycle.run(run(config))
    except (OSError, ValueError) as error:  # port in use, a bad TANDEM_EVENT_LOOP: one line, not a traceback
        print(f"router: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
