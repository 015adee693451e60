"""`tandem up` refuses bad settings with one line naming them, before it starts any process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem import cli


def test_up_with_a_folder_that_is_no_model_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["up", "--model", str(tmp_path)])
    assert stopped.value.code == f"tandem up: --model {tmp_path}: not a Hugging Face model directory (no config.json)"


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--decode-workers", "0", "--decode-workers must be at least 1"),
    ("--prefill-workers", "-1", "--prefill-workers must be at least 0"),
    ("--kv-processes", "33", "--kv-processes must be in [0, 32]"),
])
def test_up_refuses_counts_out_of_range(flag: str, value: str, message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["up", flag, value])
    assert stopped.value.code == f"tandem up: {message}"


@pytest.mark.parametrize("extra", [["--prefill-workers", "1"], ["--kv-processes", "2"], ["--policy", "kv"]])
def test_up_refuses_an_engine_process_with_what_needs_the_pool_in_the_worker(extra: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["up", "--engine-process", *extra])
    assert str(stopped.value.code).startswith("tandem up: --engine-process keeps the KV pool in the engine's own")


@pytest.mark.parametrize(("argv", "wanted"), [
    ([], False),  # off by default
    (["--device", "cuda"], False),
    (["--engine-process", "auto"], False),  # auto on a CPU: no gain there, so the engine stays in the worker
    (["--engine-process", "auto", "--device", "cuda"], True),  # auto on a GPU
    (["--engine-process", "auto", "--device", "cuda:1"], True),
    # auto never takes what disaggregation needs
    (["--engine-process", "auto", "--device", "cuda", "--prefill-workers", "1"], False),
    (["--engine-process", "auto", "--device", "cuda", "--kv-processes", "2"], False),
    (["--engine-process", "auto", "--device", "cuda", "--policy", "kv"], False),
    (["--engine-process"], True),  # bare flag: on, also on a CPU
    (["--engine-process", "on"], True),
    (["--engine-process", "off", "--device", "cuda"], False),
    (["--engine-process", "0", "--device", "cuda"], False),
])
def test_engine_process_is_off_unless_asked_and_auto_is_on_for_a_gpu_without_disaggregation(argv: list[str], wanted: bool) -> None:
    assert cli.engine_process_wanted(cli._up_parser().parse_args(argv)) is wanted


@pytest.mark.parametrize(("value", "wanted"), [("1", True), ("on", True), ("0", False), ("off", False),
                                                ("auto", True)])
def test_engine_process_follows_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, wanted: bool) -> None:
    monkeypatch.setenv("TANDEM_ENGINE_PROCESS", value)
    assert cli.engine_process_wanted(cli._up_parser().parse_args(["--device", "cuda"])) is wanted


def test_engine_process_setting_names_what_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli._up_parser().parse_args(["--engine-process", "maybe"])
    assert "expected auto, on or off, got 'maybe'" in capsys.readouterr().err


def test_a_worker_that_keeps_exiting_soon_waits_twice_as_long_each_time_up_to_a_cap() -> None:
    delays, previous = [], 0.0
    for _ in range(7):  # each run lasts 2 s
        previous = cli.restart_delay(previous, lived_s=2.0)
        delays.append(previous)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # One that had run a while before it exited is started again after the first delay.
    assert cli.restart_delay(30.0, lived_s=cli.RESTART_STABLE_S) == cli.RESTART_FIRST_DELAY_S


@pytest.mark.parametrize(("argv", "env", "restart"), [
    ([], None, True),  # on by default
    (["--restart-workers", "0"], None, False),
    ([], "off", False),
    (["--restart-workers", "on"], "off", True),
])
def test_restart_workers_setting(monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None,
                                 restart: bool) -> None:
    if env is None:
        monkeypatch.delenv("TANDEM_RESTART_WORKERS", raising=False)
    else:
        monkeypatch.setenv("TANDEM_RESTART_WORKERS", env)
    assert cli._up_parser().parse_args(argv).restart_workers is restart
