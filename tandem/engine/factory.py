"""Build an engine from its configuration; the only place that knows every implementation."""

from __future__ import annotations

from collections.abc import Callable

from tandem.engine.config import EngineConfig
from tandem.engine.protocol import Engine
from tandem.engine.types import StepInfo


def create_engine(config: EngineConfig, on_step: Callable[[StepInfo], None] | None = None) -> Engine:
    """``on_step`` is called after every forward pass (from the engine's thread) for metrics."""
    if config.own_process:
        from tandem.engine.process import EngineProcess

        return EngineProcess(config, on_step=on_step)
    if config.engine == "hf":
        from tandem.engine.hf.engine import HFEngine

        return HFEngine(config, on_step=on_step)
    raise ValueError(f"unknown engine {config.engine!r}")
