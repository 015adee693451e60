"""Tandem services: one package per role, each started with `python -m services.<role>`."""

import tandem  # noqa: F401 (before any service module imports grpc: tandem sets gRPC's I/O defaults)
