"""Structured logging (structlog) with the request id bound through context variables."""

from __future__ import annotations

import logging
import os
import sys

import structlog

REQUEST_ID_HEADER = "x-request-id"  # HTTP header and gRPC metadata key alike


def configure_logging(service: str, *, json: bool | None = None, level: str | None = None) -> None:
    """Call once from a service's ``__main__``. JSON when $TANDEM_LOG_JSON=1 (containers)."""
    if json is None:
        json = os.environ.get("TANDEM_LOG_JSON", "0") == "1"
    level_name = (level or os.environ.get("TANDEM_LOG_LEVEL", "INFO")).upper()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
