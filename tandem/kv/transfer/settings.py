"""Transfer settings and limits, importable without torch or gRPC (configs parse them at start-up)."""

from __future__ import annotations

from dataclasses import dataclass

# gRPC's default message limit is 4 MiB; chunks stay well under it with room for the header.
MAX_CHUNK_BYTES = 3 * 1024 * 1024 + 512 * 1024
# Fewer, larger messages: with CRC-32C and no join copy, 3 MiB chunks pulled 1.5-1.6 GB/s against
# 0.9-1.1 for 2 MiB in the same run on a 16-core host (benchmarks/kv_transfer.py, 8k tokens).
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024


@dataclass(slots=True, frozen=True)
class PullSettings:
    """Decode-side transfer settings; validated with errors naming the setting."""

    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    num_streams: int = 2
    max_retries: int = 3
    retry_backoff_s: float = 0.05
    verify_shm_checksums: bool = False
    num_copy_threads: int = 2  # threads verifying chunks and copying them into the pool

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid KV transfer setting {name}: {why}")

        if not 64 * 1024 <= self.max_chunk_bytes <= MAX_CHUNK_BYTES:
            raise bad("max_chunk_bytes", f"must be in [65536, {MAX_CHUNK_BYTES}] (gRPC's 4 MiB message limit), "
                      f"got {self.max_chunk_bytes}")
        if not 1 <= self.num_streams <= 16:
            raise bad("num_streams", f"must be in [1, 16], got {self.num_streams}")
        if not 0 <= self.max_retries <= 10:
            raise bad("max_retries", f"must be in [0, 10], got {self.max_retries}")
        if not 1 <= self.num_copy_threads <= 32:
            raise bad("num_copy_threads", f"must be in [1, 32], got {self.num_copy_threads}")
        if not self.retry_backoff_s >= 0:
            raise bad("retry_backoff_s", f"must be >= 0, got {self.retry_backoff_s}")
