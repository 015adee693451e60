"""Where the engine tests run.

``TANDEM_TEST_DEVICE`` (default ``cpu``) is the torch device of the engines the integration tests
build, so the same tests check a GPU machine (``cuda``). ``TANDEM_TEST_MODEL`` is a local model
directory to use instead of the default model, for a machine without the default model's package;
tests that assert what SmolLM2 itself answers only hold with the default model.
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("TANDEM_TEST_DEVICE", "cpu")
TEST_MODEL = os.environ.get("TANDEM_TEST_MODEL", "")
