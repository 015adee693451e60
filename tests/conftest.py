"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tandem  # noqa: F401 (first: in-process gRPC servers get the services' gRPC defaults)

# One torch thread per test process: the suite runs on 2-core machines beside real services.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model, converted once into the cache (~30 s the first time)."""
    import torch

    from tandem.models import resolve_model
    from tests.settings import TEST_MODEL

    torch.set_num_threads(1)
    return Path(TEST_MODEL) if TEST_MODEL else resolve_model(None)
