"""Prefill worker settings: the decode worker's server and engine settings plus leases and shared memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, cast

from services.decode.config import _FLAGS as _DECODE_FLAGS
from services.decode.config import DecodeConfig
from services.decode.config import parse_args as _parse_args

PREFILL_TRANSPORTS = ("auto", "grpc")


@dataclass(slots=True)
class PrefillConfig(DecodeConfig):
    """``kv_transport`` here says what the worker serves: auto = gRPC and shared memory, grpc = gRPC only."""

    role: ClassVar[str] = "prefill"

    kv_lease_s: float = 30.0  # blocks not released this long after Prefill answered are freed
    shm_pool_bytes: int = 1024 * 1024 * 1024  # idle shared-memory segments kept for reuse
    kv_export_processes: int = 0  # processes serving PullKv beside the worker (0: the worker alone)

    def __post_init__(self) -> None:
        # Explicit base call: zero-argument super() does not work in slotted dataclasses.
        DecodeConfig.__post_init__(self)
        if self.engine_process:
            raise ValueError("invalid prefill setting engine_process: a prefill worker exports KV from its engine's "
                             "pool, which an engine process does not share")
        if self.kv_transport not in PREFILL_TRANSPORTS:
            raise ValueError(f"invalid prefill setting kv_transport: {self.kv_transport!r} is not one of "
                             f"{', '.join(PREFILL_TRANSPORTS)}")
        if not self.kv_lease_s > 0:
            raise ValueError(f"invalid prefill setting kv_lease_s: must be > 0, got {self.kv_lease_s}")
        if not 0 <= self.kv_export_processes <= 32:
            raise ValueError(f"invalid prefill setting kv_export_processes: must be in [0, 32], got "
                             f"{self.kv_export_processes}")
        if self.shm_pool_bytes < 0:
            raise ValueError(f"invalid prefill setting shm_pool_bytes: must be >= 0, got {self.shm_pool_bytes}")

    @property
    def serves_shm(self) -> bool:
        return self.kv_transport == "auto"


# The decode worker's flags minus the pulling side's, plus the prefill worker's own.
_PULL_ONLY = ("--kv-streams", "--kv-chunk-bytes", "--kv-max-retries", "--kv-transfer-timeout-s", "--prefill-timeout-s",
              "--kv-pull-processes", "--engine-process")
FLAGS: dict[str, tuple[str, type | object]] = {
    **{flag: spec for flag, spec in _DECODE_FLAGS.items() if flag not in _PULL_ONLY},
    "--kv-lease-s": ("TANDEM_KV_LEASE_S", float),
    "--shm-pool-bytes": ("TANDEM_SHM_POOL_BYTES", int),
    "--kv-export-processes": ("TANDEM_KV_EXPORT_PROCESSES", int),
}
HELP = {
    "--worker-id": "default prefill-<advertise-host>-<port>",
    "--kv-transport": f"transports served: {', '.join(PREFILL_TRANSPORTS)} (auto: gRPC and shared memory)",
    "--kv-lease-s": "seconds prefilled blocks wait for a pull before they are freed",
    "--shm-pool-bytes": "bytes of idle shared-memory segments kept for reuse",
    "--shm-dir": "where shared-memory segments are made",
    "--kv-export-processes": "processes serving gRPC KV pulls beside the worker, over its pool in shared memory "
                             "(CPU engines; 0: the worker serves them)",
}


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> PrefillConfig:
    """Flags win over environment variables, which win over the defaults."""
    return cast(PrefillConfig, _parse_args(argv, environ, config_class=PrefillConfig, flags=FLAGS, help_texts=HELP))
