"""The committed stubs in tandem/proto match what protos/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_enum_starts_with_unspecified() -> None:
    from google.protobuf.descriptor import FileDescriptor

    from tandem.proto.api.v1 import api_pb2
    from tandem.proto.common.v1 import common_pb2
    from tandem.proto.router.v1 import router_pb2
    from tandem.proto.worker.v1 import worker_pb2

    files: list[FileDescriptor] = [m.DESCRIPTOR for m in (api_pb2, common_pb2, router_pb2, worker_pb2)]
    for file in files:
        assert file.package.startswith("tandem.") and file.package.endswith(".v1")
        for enum in file.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.full_name
