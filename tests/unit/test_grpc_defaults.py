"""Tandem's processes run gRPC with its older poller unless the operator says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tandem

# Imports a service's modules the way `python -m services.<role>` does, and prints GRPC_EXPERIMENTS
# as it stood when grpc itself was first imported: grpc reads the variable then, and only then.
PROBE = """
import importlib, os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return None
sys.meta_path.insert(0, Spy())
importlib.import_module(sys.argv[1])
print(repr(seen[0]) if seen else "grpc never imported")
"""


def _grpc_saw(module: str, env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if env_value is not None:
        env["GRPC_EXPERIMENTS"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE, module], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert "Unknown experiment" not in out.stderr, out.stderr  # every name exists in the pinned grpcio
    return out.stdout.strip()


@pytest.mark.parametrize("module", ["services.frontend.__main__", "services.router.__main__",
                                    "services.decode.__main__", "services.prefill.__main__", "tandem.cli"])
def test_every_entry_point_sets_the_default_before_grpc_loads(module: str) -> None:
    assert _grpc_saw(module, None) == repr(tandem.GRPC_EXPERIMENTS_DEFAULT)


def test_operator_setting_wins_even_when_empty() -> None:
    assert _grpc_saw("services.decode.__main__", "") == repr("")
    assert _grpc_saw("services.decode.__main__", "-event_engine_client") == repr("-event_engine_client")
