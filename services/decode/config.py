"""Decode worker settings: typed, validated at start-up, read from flags with environment fallbacks."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tandem.discovery.consul import REGISTRIES, ConsulSettings
from tandem.engine.config import ENGINES, EngineConfig, on_off
from tandem.kv.transfer.settings import DEFAULT_CHUNK_BYTES, PullSettings

KV_TRANSPORTS = ("auto", "grpc", "shm")


@dataclass(slots=True)
class DecodeConfig:
    role: ClassVar[str] = "decode"  # names the service in errors; the prefill worker reuses this class

    host: str = "0.0.0.0"
    port: int = 9200  # 0 picks a free port
    advertise_host: str = "127.0.0.1"  # what the router hands to frontends, with the bound port
    metrics_port: int = 9201  # 0 disables the Prometheus endpoint
    router_address: str = ""  # host:port; empty: serve without registering
    worker_id: str = ""  # empty: decode-<advertise_host>-<port>
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # Engine settings (see tandem.engine.config.EngineConfig); empty model = the default model.
    model: str = ""
    engine: str = "hf"
    num_kv_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_queue_len: int = 256
    max_model_len: int | None = None
    num_threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_wait_ms: float = 8.0
    engine_process: bool = False  # the engine in a child process (tandem.engine.process); not for KV import
    # Disaggregation: pulling KV from prefill workers (see tandem.kv.transfer.pull.PullSettings).
    kv_transport: str = "auto"  # auto: shared memory when the prefill worker is on this host, else gRPC
    kv_streams: int = 2  # parallel PullKv streams per transfer (gRPC)
    kv_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    kv_max_retries: int = 3
    kv_transfer_timeout_s: float = 30.0
    kv_pull_processes: int = 0  # helper processes running the gRPC pull streams (0: this process)
    prefill_timeout_s: float = 60.0  # a remote Prefill call; past it the prompt is prefilled here
    shm_dir: str = "/dev/shm"
    # Where the worker lists itself: "embedded" (the router's RegisterWorker stream, router_address)
    # or "consul" (the local agent, which health-checks it over gRPC; see tandem.discovery.consul).
    registry: str = "embedded"
    consul_address: str = "127.0.0.1:8500"
    consul_service_prefix: str = "tandem"
    consul_check_interval_s: float = 1.0
    consul_deregister_after_s: float = 60.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid {self.role} setting {name}: {why}")

        for name in ("host", "advertise_host"):
            if not getattr(self, name):
                raise bad(name, "must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise bad(name, f"must be in [0, 65535], got {value}")
        if self.router_address:
            host, _, port = self.router_address.rpartition(":")
            if not host or not port.isdigit():
                raise bad("router_address", f"must be host:port, got {self.router_address!r}")
        if not self.drain_timeout_s >= 0:
            raise bad("drain_timeout_s", f"must be >= 0, got {self.drain_timeout_s}")
        if self.num_threads is not None and self.num_threads < 1:
            raise bad("num_threads", f"must be at least 1, got {self.num_threads}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise bad("kv_transport", f"{self.kv_transport!r} is not one of {', '.join(KV_TRANSPORTS)}")
        for name in ("kv_transfer_timeout_s", "prefill_timeout_s"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        self.pull_settings()
        if not 0 <= self.kv_pull_processes <= 32:
            raise bad("kv_pull_processes", f"must be in [0, 32], got {self.kv_pull_processes}")
        if self.engine_process and self.kv_pull_processes:
            raise bad("engine_process", "pull helpers write into the engine's KV pool, which an engine process "
                                        "does not share: set kv_pull_processes to 0 or engine_process to 0")
        if self.registry not in REGISTRIES:
            raise bad("registry", f"{self.registry!r} is not one of {', '.join(REGISTRIES)}")
        if self.registry == "consul":
            try:
                self.consul()
            except ValueError as error:
                raise ValueError(str(error).replace("invalid setting", f"invalid {self.role} setting", 1)) from None
        # Validate the engine settings now, before the model is resolved (which may take a while).
        self.engine_config(Path(self.model or "."))

    def consul(self) -> ConsulSettings:
        return ConsulSettings(address=self.consul_address, service_prefix=self.consul_service_prefix,
                              check_interval_s=self.consul_check_interval_s,
                              deregister_after_s=self.consul_deregister_after_s)

    def pull_settings(self) -> PullSettings:
        return PullSettings(max_chunk_bytes=self.kv_chunk_bytes, num_streams=self.kv_streams,
                            max_retries=self.kv_max_retries)

    def engine_config(self, model_path: Path) -> EngineConfig:
        return EngineConfig(
            model_path=model_path, engine=self.engine, block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_queue_len=self.max_queue_len,
            max_model_len=self.max_model_len, device=self.device, dtype=self.dtype, num_threads=self.num_threads,
            batch_wait_ms=self.batch_wait_ms, own_process=self.engine_process,
        )


def _optional_int(text: str) -> int | None:
    """Empty or 0 means "not set" for the settings that default to the model or torch."""
    return int(text) or None if text else None


# flag -> (environment variable, type); the config field is the flag with dashes as underscores.
_FLAGS: dict[str, tuple[str, type | object]] = {
    "--host": ("TANDEM_HOST", str),
    "--port": ("TANDEM_WORKER_PORT", int),
    "--advertise-host": ("TANDEM_ADVERTISE_HOST", str),
    "--metrics-port": ("TANDEM_METRICS_PORT", int),
    "--router-address": ("TANDEM_ROUTER_ADDRESS", str),
    "--worker-id": ("TANDEM_WORKER_ID", str),
    "--drain-timeout": ("TANDEM_DRAIN_TIMEOUT_S", float),
    "--model": ("TANDEM_MODEL", str),
    "--engine": ("TANDEM_ENGINE", str),
    "--num-kv-blocks": ("TANDEM_NUM_KV_BLOCKS", int),
    "--block-size": ("TANDEM_BLOCK_SIZE", int),
    "--max-num-seqs": ("TANDEM_MAX_NUM_SEQS", int),
    "--max-num-batched-tokens": ("TANDEM_MAX_NUM_BATCHED_TOKENS", int),
    "--max-queue-len": ("TANDEM_MAX_QUEUE_LEN", int),
    "--max-model-len": ("TANDEM_MAX_MODEL_LEN", _optional_int),
    "--num-threads": ("TANDEM_NUM_THREADS", _optional_int),
    "--device": ("TANDEM_DEVICE", str),
    "--dtype": ("TANDEM_DTYPE", str),
    "--batch-wait-ms": ("TANDEM_BATCH_WAIT_MS", float),
    "--engine-process": ("TANDEM_ENGINE_PROCESS", on_off),
    "--kv-transport": ("TANDEM_KV_TRANSPORT", str),
    "--kv-streams": ("TANDEM_KV_STREAMS", int),
    "--kv-chunk-bytes": ("TANDEM_KV_CHUNK_BYTES", int),
    "--kv-max-retries": ("TANDEM_KV_MAX_RETRIES", int),
    "--kv-transfer-timeout-s": ("TANDEM_KV_TRANSFER_TIMEOUT_S", float),
    "--kv-pull-processes": ("TANDEM_KV_PULL_PROCESSES", int),
    "--prefill-timeout-s": ("TANDEM_PREFILL_TIMEOUT_S", float),
    "--shm-dir": ("TANDEM_SHM_DIR", str),
    "--registry": ("TANDEM_REGISTRY", str),
    "--consul-address": ("TANDEM_CONSUL_ADDRESS", str),
    "--consul-service-prefix": ("TANDEM_CONSUL_SERVICE_PREFIX", str),
    "--consul-check-interval-s": ("TANDEM_CONSUL_CHECK_INTERVAL_S", float),
    "--consul-deregister-after-s": ("TANDEM_CONSUL_DEREGISTER_AFTER_S", float),
}
_HELP = {
    "--port": "gRPC port, 0 picks a free one",
    "--advertise-host": "host the router gives to frontends (with the bound port)",
    "--metrics-port": "Prometheus port, 0 disables",
    "--router-address": "router host:port to register with; empty serves unregistered",
    "--worker-id": "default decode-<advertise-host>-<port>",
    "--drain-timeout": "seconds in-flight requests get to finish on SIGTERM",
    "--model": "local Hugging Face model directory; empty = the default model",
    "--engine": f"one of {', '.join(ENGINES)}",
    "--max-model-len": "context length; default the model's",
    "--num-threads": "torch intra-op threads; default torch's",
    "--batch-wait-ms": "an idle engine waits up to this long (at most 7.5%% of a recent step) for more requests "
                       "to prefill together; 0: never",
    "--engine-process": "1: the engine runs in a child process, its forward passes apart from this process's "
                        "gRPC threads (no KV from prefill workers, no KV events)",
    "--kv-transport": f"how KV comes from prefill workers: {', '.join(KV_TRANSPORTS)} (auto: shm on the same host)",
    "--kv-streams": "parallel PullKv streams per transfer",
    "--kv-chunk-bytes": "KV chunk size bound (under gRPC's 4 MiB message limit)",
    "--kv-max-retries": "times a missing or corrupt chunk is asked for again",
    "--kv-transfer-timeout-s": "deadline of one KV transfer; past it the prompt is prefilled here",
    "--kv-pull-processes": "helper processes that pull gRPC KV streams into the pool, moved to shared memory "
                           "(CPU engines; 0: this process pulls)",
    "--prefill-timeout-s": "deadline of a remote Prefill call",
    "--registry": f"one of {', '.join(REGISTRIES)}: the router's registration stream, or the Consul agent",
    "--consul-address": "host:port of the local Consul agent's HTTP API",
    "--consul-service-prefix": "the service is named PREFIX-<role>",
    "--consul-check-interval-s": "how often Consul runs the worker's gRPC health check",
    "--consul-deregister-after-s": "Consul drops the worker once its check is critical this long (>= 60)",
}


def _field_name(flag: str) -> str:
    return "drain_timeout_s" if flag == "--drain-timeout" else flag[2:].replace("-", "_")


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, *,
               config_class: type[DecodeConfig] = DecodeConfig,
               flags: Mapping[str, tuple[str, type | object]] | None = None,
               help_texts: Mapping[str, str] | None = None) -> DecodeConfig:
    """Flags win over environment variables, which win over the defaults.

    The prefill worker passes its config class and flag table (it shares the engine settings).
    """
    env = os.environ if environ is None else environ
    defaults = config_class()
    role = config_class.role
    parser = argparse.ArgumentParser(prog=f"python -m services.{role}", description=f"Tandem {role} worker")
    helps = {**_HELP, **(help_texts or {})}
    for flag, (variable, kind) in (_FLAGS if flags is None else flags).items():
        default = getattr(defaults, _field_name(flag))
        # argparse runs `type` on string defaults too, so a bad environment value is reported here.
        parser.add_argument(
            flag, dest=_field_name(flag), type=kind,  # type: ignore[arg-type]
            default=env.get(variable, "" if default is None else str(default)),
            help=f"{helps.get(flag, '')} (${variable})".strip(),
        )
    args = parser.parse_args(argv)
    try:
        return config_class(**vars(args))
    except ValueError as error:
        parser.error(str(error))
