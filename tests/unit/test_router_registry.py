"""The embedded registry and router settings: fake clock, no sockets."""

from __future__ import annotations

import pytest

from services.router.config import RouterConfig, parse_args
from services.router.registry import EmbeddedRegistry, WorkerInfo, WorkerLoad, WorkerRole

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def info(worker_id: str = "w1", address: str = "h:1") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=WorkerRole.DECODE, address=address, model="m")


def test_load_report_resets_routed_count_and_keeps_worker_healthy() -> None:
    clock = FakeClock()
    registry = EmbeddedRegistry(stale_after_s=5.0, clock=clock)
    registration = registry.register(info())
    registry.note_routed("w1")
    registry.note_routed("w1")
    assert registry.snapshot()[0].num_routed_since_report == 2
    clock.now += 4.0
    assert registry.report_load("w1", registration, WorkerLoad(num_running=3))
    (snapshot,) = registry.snapshot()
    assert (snapshot.load.num_running, snapshot.num_routed_since_report, snapshot.healthy) == (3, 0, True)


def test_silent_worker_turns_unhealthy_and_recovers_on_report() -> None:
    clock = FakeClock()
    registry = EmbeddedRegistry(stale_after_s=5.0, clock=clock)
    registration = registry.register(info())
    clock.now += 5.1
    assert not registry.snapshot()[0].healthy
    registry.report_load("w1", registration, WorkerLoad())
    assert registry.snapshot()[0].healthy


def test_reregistration_replaces_and_old_stream_cannot_remove_it() -> None:
    registry = EmbeddedRegistry(clock=FakeClock())
    old = registry.register(info(address="h:1"))
    new = registry.register(info(address="h:2"))
    assert len(registry) == 1 and registry.snapshot()[0].info.address == "h:2"
    assert not registry.report_load("w1", old, WorkerLoad(num_running=9))
    assert not registry.remove("w1", old)
    assert "w1" in registry
    assert registry.remove("w1", new)
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"port": 70000}, "port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"policy": "fastest"}, "policy"),
        ({"worker_stale_s": 0}, "worker_stale_s"),
        ({"host": ""}, "host"),
    ],
)
def test_config_errors_name_the_setting(settings: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError, match=f"invalid router setting {named}:"):
        RouterConfig(**settings)  # type: ignore[arg-type]


def test_flags_win_over_environment() -> None:
    env = {"TANDEM_ROUTER_PORT": "9500", "TANDEM_ROUTER_POLICY": "random", "TANDEM_METRICS_PORT": "0"}
    assert parse_args([], env) == RouterConfig(port=9500, policy="random", metrics_port=0)
    assert parse_args(["--port", "0", "--policy", "round-robin"], env).port == 0
    with pytest.raises(SystemExit):
        parse_args([], {"TANDEM_ROUTER_PORT": "not-a-port"})
