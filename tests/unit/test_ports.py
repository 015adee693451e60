"""Ports: a gRPC service refuses a port another already serves; free_port never hands out a port twice."""

from __future__ import annotations

import pytest

from tandem import procs
from tandem.grpc_server import GrpcService

pytestmark = pytest.mark.unit


@pytest.mark.asyncio
async def test_a_second_grpc_service_on_a_served_port_fails_to_bind() -> None:
    first = GrpcService("127.0.0.1", 0, ["test.First"])
    await first.start()
    try:
        with pytest.raises(OSError, match=f"cannot bind gRPC port 127.0.0.1:{first.port}"):
            GrpcService("127.0.0.1", first.port, ["test.Second"])
    finally:
        await first.stop(0)


def test_free_port_hands_out_each_port_once() -> None:
    ports = [procs.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
