"""Frontend settings: flags, environment fallbacks, and errors naming the bad setting."""

from __future__ import annotations

import pytest

from services.frontend.__main__ import parse_args
from services.frontend.server import FrontendConfig

pytestmark = pytest.mark.unit


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TANDEM_MODEL", "TANDEM_ROUTER_ADDRESS", "TANDEM_REQUEST_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    config = parse_args([])
    assert (config.model, config.http_port, config.grpc_port) == ("", 8000, 8001)
    assert config.router_address == "127.0.0.1:9100" and config.request_timeout_s == 600.0


def test_environment_fallbacks_and_flags_winning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_MODEL", "/models/x")
    monkeypatch.setenv("TANDEM_ROUTER_ADDRESS", "router:9100")
    config = parse_args(["--http-port", "0", "--grpc-port", "0", "--served-model-name", "tiny"])
    assert config.model == "/models/x" and config.router_address == "router:9100"
    assert (config.http_port, config.grpc_port, config.served_model_name) == (0, 0, "tiny")
    assert parse_args(["--router-address", "other:1"]).router_address == "other:1"
    assert parse_args(["--request-timeout-s", "0"]).request_timeout_s is None


def test_route_prediction_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_ROUTE_PREDICTION", raising=False)
    assert parse_args([]).predict_routes
    assert not parse_args(["--no-route-prediction"]).predict_routes
    monkeypatch.setenv("TANDEM_ROUTE_PREDICTION", "0")
    assert not parse_args([]).predict_routes
    assert parse_args(["--route-prediction"]).predict_routes  # the flag wins


def test_worker_streams_are_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_WORKER_STREAMS", raising=False)
    assert parse_args([]).worker_streams
    assert not parse_args(["--no-worker-streams"]).worker_streams
    monkeypatch.setenv("TANDEM_WORKER_STREAMS", "0")
    assert not parse_args([]).worker_streams
    assert parse_args(["--worker-streams"]).worker_streams  # the flag wins


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"http_port": 70000}, "http_port"),
    ({"grpc_port": -1}, "grpc_port"),
    ({"router_address": "nohost"}, "router_address"),
    ({"request_timeout_s": 0}, "request_timeout_s"),
    ({"max_model_len": 1}, "max_model_len"),
    ({"max_reroutes": -1}, "max_reroutes"),
])
def test_bad_settings_are_named(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        FrontendConfig(**kwargs)  # type: ignore[arg-type]
