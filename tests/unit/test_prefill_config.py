"""Prefill and decode worker settings for disaggregation: flags, environment, errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.decode.config import DecodeConfig
from services.decode.config import parse_args as parse_decode
from services.prefill.config import PrefillConfig
from services.prefill.config import parse_args as parse_prefill

pytestmark = pytest.mark.unit


def test_prefill_flags_and_environment() -> None:
    config = parse_prefill(["--kv-lease-s", "2.5", "--port", "0", "--kv-transport", "grpc"], {"TANDEM_SHM_DIR": "/tmp"})
    assert (config.kv_lease_s, config.port, config.kv_transport, config.shm_dir) == (2.5, 0, "grpc", "/tmp")
    assert not config.serves_shm and PrefillConfig().serves_shm


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kv_lease_s": 0}, "invalid prefill setting kv_lease_s"),
    ({"kv_transport": "shm"}, "invalid prefill setting kv_transport"),
    ({"shm_pool_bytes": -1}, "invalid prefill setting shm_pool_bytes"),
    ({"port": 70000}, "invalid prefill setting port"),
    ({"kv_export_processes": -1}, "invalid prefill setting kv_export_processes"),
    ({"kv_export_processes": 33}, "invalid prefill setting kv_export_processes"),
])
def test_prefill_errors_name_the_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefillConfig(**kwargs)  # type: ignore[arg-type]


def test_helper_process_flags_and_environment() -> None:
    assert parse_prefill(["--kv-export-processes", "3"], {}).kv_export_processes == 3
    assert parse_prefill([], {"TANDEM_KV_EXPORT_PROCESSES": "2"}).kv_export_processes == 2
    assert parse_decode(["--kv-pull-processes", "4"], {}).kv_pull_processes == 4
    assert DecodeConfig().kv_pull_processes == 0 and PrefillConfig().kv_export_processes == 0  # opt-in
    with pytest.raises(SystemExit):
        parse_prefill(["--kv-pull-processes", "2"], {})


def test_pulling_flags_are_the_decode_workers_only() -> None:
    with pytest.raises(SystemExit):
        parse_prefill(["--kv-streams", "4"], {})
    config = parse_decode(["--kv-streams", "4", "--kv-transport", "shm", "--kv-chunk-bytes", "1048576"], {})
    settings = config.pull_settings()
    assert (settings.num_streams, settings.max_chunk_bytes, config.kv_transport) == (4, 1 << 20, "shm")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kv_transport": "rdma"}, "invalid decode setting kv_transport"),
    ({"kv_transfer_timeout_s": 0}, "invalid decode setting kv_transfer_timeout_s"),
    ({"kv_chunk_bytes": 8 << 20}, "invalid KV transfer setting max_chunk_bytes"),
    ({"kv_pull_processes": -1}, "invalid decode setting kv_pull_processes"),
])
def test_decode_errors_name_the_setting(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**kwargs)  # type: ignore[arg-type]


def test_batch_wait_reaches_the_engine_from_flag_or_environment_and_is_validated() -> None:
    assert parse_decode(["--batch-wait-ms", "0"], {}).engine_config(Path(".")).batch_wait_ms == 0
    assert parse_prefill([], {"TANDEM_BATCH_WAIT_MS": "2.5"}).engine_config(Path(".")).batch_wait_ms == 2.5
    assert DecodeConfig().batch_wait_ms == 8.0
    with pytest.raises(ValueError, match="invalid engine setting batch_wait_ms"):
        DecodeConfig(batch_wait_ms=-1)


def test_engine_process_flag_environment_and_conflicts(tmp_path: Path) -> None:
    assert parse_decode(["--engine-process", "1"], {}).engine_process
    assert parse_decode([], {"TANDEM_ENGINE_PROCESS": "1"}).engine_process
    assert not parse_decode([], {}).engine_process  # opt-in
    assert DecodeConfig(engine_process=True).engine_config(tmp_path).own_process
    with pytest.raises(SystemExit):  # argparse names the flag and the bad value
        parse_decode(["--engine-process", "maybe"], {})
    with pytest.raises(ValueError, match="invalid decode setting engine_process: pull helpers"):
        DecodeConfig(engine_process=True, kv_pull_processes=2)
    with pytest.raises(ValueError, match="invalid prefill setting engine_process"):
        PrefillConfig(engine_process=True)
    with pytest.raises(SystemExit):  # a prefill worker has no such flag
        parse_prefill(["--engine-process", "1"], {})
