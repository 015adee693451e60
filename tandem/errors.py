"""Errors that carry the request field at fault, so every API can name it to the client."""

from __future__ import annotations


class TandemError(Exception):
    """Base class; ``code`` maps onto gRPC status codes and HTTP statuses."""

    code = "internal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequest(TandemError):
    code = "invalid_argument"


class NotFound(TandemError):
    code = "not_found"


class Unavailable(TandemError):
    code = "unavailable"


class ResourceExhausted(TandemError):
    code = "resource_exhausted"
