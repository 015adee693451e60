"""Engines: the `Engine` protocol and its implementations (hf today; vllm and sim follow)."""

from tandem.engine.protocol import Engine
from tandem.engine.types import (
    EngineRequest,
    EngineStats,
    FinishReason,
    RequestOutput,
    SamplingParams,
)

__all__ = ["Engine", "EngineRequest", "EngineStats", "FinishReason", "RequestOutput", "SamplingParams"]
