"""Every Tandem process runs its asyncio code on uvloop unless TANDEM_EVENT_LOOP says otherwise."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from tandem import lifecycle

pytestmark = pytest.mark.unit


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_EVENT_LOOP", raising=False)
    assert lifecycle.run(_loop_module()).startswith("uvloop")


@pytest.mark.parametrize(("setting", "expected"), [("asyncio", "asyncio"), ("UVLOOP", "uvloop"), ("", "uvloop")])
def test_the_setting_picks_the_loop(monkeypatch: pytest.MonkeyPatch, setting: str, expected: str) -> None:
    monkeypatch.setenv("TANDEM_EVENT_LOOP", setting)
    assert lifecycle.run(_loop_module()).startswith(expected)


def test_a_bad_setting_is_named_and_nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_EVENT_LOOP", "tokio")
    ran = []

    async def main() -> None:
        ran.append(True)

    with pytest.raises(ValueError, match="TANDEM_EVENT_LOOP='tokio': expected one of uvloop, asyncio"):
        lifecycle.run(main())
    assert not ran


@pytest.mark.parametrize("role", ["frontend", "router", "decode", "prefill"])
def test_each_service_refuses_a_bad_setting_in_one_line(role: str) -> None:
    """The services start through lifecycle.run: a bad loop name stops them with one line, no traceback."""
    env = {**os.environ, "TANDEM_EVENT_LOOP": "tokio"}
    out = subprocess.run([sys.executable, "-m", f"services.{role}"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert f"{role}: TANDEM_EVENT_LOOP='tokio'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


class _Service:
    def __init__(self) -> None:
        self.failed = asyncio.Event()
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True


def test_a_service_that_fails_is_stopped_and_says_so() -> None:
    service = _Service()

    async def start() -> _Service:
        asyncio.get_running_loop().call_later(0.05, service.failed.set)  # its engine dies
        return service

    assert lifecycle.run(lifecycle.serve_until_signal(start)) is False
    assert service.stopped


def test_a_signal_stops_a_service_that_did_not_fail() -> None:
    service = _Service()

    async def start() -> _Service:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return service

    assert lifecycle.run(lifecycle.serve_until_signal(start)) is True
    assert service.stopped and not service.failed.is_set()
