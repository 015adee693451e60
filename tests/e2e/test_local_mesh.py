"""The test harness's mesh (tandem.local_mesh) survives the free-port race at start-up."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tandem.local_mesh import LocalMesh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_worker_whose_port_was_taken_starts_again_on_fresh_ports(model_path: Path) -> None:
    # Between free_port() and the worker's bind another process (or an outgoing connection) can
    # take the port; the worker exits "address in use" and the start must not hang on it.
    mesh = LocalMesh(1, model_path=model_path)
    taken = mesh.worker_ports[0]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken[0]))
        squatter.listen()
        mesh.start(timeout_s=120)
        try:
            assert mesh.worker_ports[0] != taken
            assert mesh.healthy_workers() == ["decode-0"]
        finally:
            mesh.stop()
