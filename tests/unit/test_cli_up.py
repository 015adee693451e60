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
