"""Engine configuration: typed, validated at start-up, with errors naming the bad setting."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("hf",)


@dataclass(slots=True)
class EngineConfig:
    model_path: Path
    engine: str = "hf"
    block_size: int = 16
    num_kv_blocks: int = 2048  # pool capacity; 2048 x 16 tokens of SmolLM2-135M fp32 is ~1.5 GB
    max_num_seqs: int = 32  # running requests sharing one forward pass
    max_num_batched_tokens: int = 2048  # tokens per step; long prompts are prefilled in chunks
    max_queue_len: int = 256  # waiting requests beyond this are refused (RESOURCE_EXHAUSTED)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    # An idle engine that gets a request waits up to this long for more requests to prefill in the
    # same step, ending once none came for a quiet gap (3 ms, at most 7.5% of a recent step, so a
    # lone request pays that); 0 turns the wait off.
    batch_wait_ms: float = 8.0
    # The engine in a child process of its own (tandem.engine.process), its step thread apart from
    # the worker's event loop and gRPC threads; generate/abort/stats only (no KV import or events).
    own_process: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid engine setting {name}: {why}")

        if self.engine not in ENGINES:
            raise bad("engine", f"{self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise bad("block_size", f"must be a power of two, got {self.block_size}")
        if self.num_kv_blocks < 2:
            raise bad("num_kv_blocks", f"must be at least 2, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise bad("max_num_batched_tokens", f"must be at least block_size ({self.block_size})")
        if self.max_queue_len < 1:
            raise bad("max_queue_len", f"must be at least 1, got {self.max_queue_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise bad("dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise bad("batch_wait_ms", f"must be in [0, 1000], got {self.batch_wait_ms}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", f"must be at least 2, got {self.max_model_len}")


def on_off(text: str) -> bool:
    """A yes/no setting from a flag or the environment: 1/on/true/yes, or 0/off/false/no/empty."""
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {text!r}")
