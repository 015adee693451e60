"""Router settings: typed, validated at start-up, read from flags with environment fallbacks."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.policy import POLICIES

KV_DECODE_BLOCKS = ("shared", "per-request")


@dataclass(slots=True)
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 9100  # 0 picks a free port
    metrics_port: int = 9101  # 0 disables the Prometheus endpoint
    policy: str = "least-loaded"
    # A worker reports at least every second; this much silence means its stream has stalled.
    worker_stale_s: float = 5.0
    # How long stop() waits for in-flight Route calls before cancelling them.
    grace_s: float = 5.0
    # kv policy: cost = overlap_weight x blocks to prefill + decode blocks; see policy/README.md.
    kv_overlap_weight: float = 1.0
    kv_temperature: float = 0.0
    # Predict every worker's cache from routing decisions, ignoring their KV events.
    kv_approximate: bool = False
    # Approximate mode: how long a routed prefix is assumed to stay cached.
    kv_approx_ttl_s: float = 120.0
    # "shared": a block several active requests hold counts once (memory); "per-request": each
    # request counts its whole context (attention compute), spreading hot prefixes much sooner.
    kv_decode_blocks: str = "shared"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid router setting {name}: {why}")

        if not self.host:
            raise bad("host", "must not be empty")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise bad(name, f"must be in [0, 65535], got {value}")
        if self.policy not in POLICIES:
            raise bad("policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        if not self.worker_stale_s > 0:
            raise bad("worker_stale_s", f"must be > 0, got {self.worker_stale_s}")
        if not self.grace_s >= 0:
            raise bad("grace_s", f"must be >= 0, got {self.grace_s}")
        if not (self.kv_overlap_weight >= 0 and math.isfinite(self.kv_overlap_weight)):
            raise bad("kv_overlap_weight", f"must be >= 0, got {self.kv_overlap_weight}")
        if not (self.kv_temperature >= 0 and math.isfinite(self.kv_temperature)):
            raise bad("kv_temperature", f"must be >= 0, got {self.kv_temperature}")
        if not self.kv_approx_ttl_s > 0:
            raise bad("kv_approx_ttl_s", f"must be > 0, got {self.kv_approx_ttl_s}")
        if self.kv_decode_blocks not in KV_DECODE_BLOCKS:
            raise bad("kv_decode_blocks", f"{self.kv_decode_blocks!r} is not one of {', '.join(KV_DECODE_BLOCKS)}")


def _env(environ: Mapping[str, str], name: str, default: object) -> str:
    return environ.get(name, str(default))


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RouterConfig:
    """Flags win over environment variables, which win over the defaults."""
    env = os.environ if environ is None else environ
    defaults = RouterConfig()
    parser = argparse.ArgumentParser(prog="python -m services.router", description="Tandem router")
    parser.add_argument("--host", default=_env(env, "TANDEM_HOST", defaults.host),
                        help="interface to bind ($TANDEM_HOST)")
    parser.add_argument("--port", type=int, default=_env(env, "TANDEM_ROUTER_PORT", defaults.port),
                        help="gRPC port, 0 picks a free one ($TANDEM_ROUTER_PORT)")
    parser.add_argument("--metrics-port", type=int,
                        default=_env(env, "TANDEM_METRICS_PORT", defaults.metrics_port),
                        help="Prometheus port, 0 disables ($TANDEM_METRICS_PORT)")
    parser.add_argument("--policy", choices=POLICIES,
                        default=_env(env, "TANDEM_ROUTER_POLICY", defaults.policy),
                        help="routing policy ($TANDEM_ROUTER_POLICY)")
    parser.add_argument("--worker-stale-s", type=float,
                        default=_env(env, "TANDEM_ROUTER_WORKER_STALE_S", defaults.worker_stale_s),
                        help="seconds of registration-stream silence before a worker is unhealthy")
    parser.add_argument("--grace-s", type=float, default=_env(env, "TANDEM_ROUTER_GRACE_S", defaults.grace_s),
                        help="seconds to finish in-flight calls on shutdown")
    parser.add_argument("--kv-overlap-weight", type=float,
                        default=_env(env, "TANDEM_ROUTER_KV_OVERLAP_WEIGHT", defaults.kv_overlap_weight),
                        help="kv policy: weight of a block to prefill against a decode block")
    parser.add_argument("--kv-temperature", type=float,
                        default=_env(env, "TANDEM_ROUTER_KV_TEMPERATURE", defaults.kv_temperature),
                        help="kv policy: softmax temperature over normalised costs; 0 picks the lowest")
    parser.add_argument("--kv-approximate", action="store_true",
                        default=env.get("TANDEM_ROUTER_KV_APPROXIMATE", "0") == "1",
                        help="kv policy: predict caches from routing decisions, ignoring KV events")
    parser.add_argument("--kv-approx-ttl-s", type=float,
                        default=_env(env, "TANDEM_ROUTER_KV_APPROX_TTL_S", defaults.kv_approx_ttl_s),
                        help="approximate mode: seconds a routed prefix is assumed cached")
    parser.add_argument("--kv-decode-blocks", choices=KV_DECODE_BLOCKS,
                        default=_env(env, "TANDEM_ROUTER_KV_DECODE_BLOCKS", defaults.kv_decode_blocks),
                        help="kv policy: count blocks shared by active requests once, or per request")
    # argparse runs `type` on string defaults too, so a bad environment value is reported here.
    args = parser.parse_args(argv)
    try:
        return RouterConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port, policy=args.policy,
            worker_stale_s=args.worker_stale_s, grace_s=args.grace_s,
            kv_overlap_weight=args.kv_overlap_weight, kv_temperature=args.kv_temperature,
            kv_approximate=args.kv_approximate, kv_approx_ttl_s=args.kv_approx_ttl_s,
            kv_decode_blocks=args.kv_decode_blocks,
        )
    except ValueError as error:
        parser.error(str(error))
