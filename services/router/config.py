"""Router settings: typed, validated at start-up, read from flags with environment fallbacks."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.disagg import DisaggSettings
from services.router.health_watch import HealthWatchConfig
from services.router.policy import POLICIES
from tandem.discovery.consul import REGISTRIES, ConsulSettings

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
    kv_overlap_weight: float = 4.0
    kv_temperature: float = 0.0
    # Predict every worker's cache from routing decisions, ignoring their KV events.
    kv_approximate: bool = False
    # Approximate mode: how long a routed prefix is assumed to stay cached.
    kv_approx_ttl_s: float = 120.0
    # Failure detection (services/router/health_watch.py): each worker's health is probed this often;
    # an unanswered probe after the timeout quarantines it (a hung worker leaves routing in ~1.5 s).
    health_probe_interval_s: float = 0.5
    health_probe_timeout_s: float = 1.0
    quarantine_min_s: float = 1.0  # a quarantined worker is restored no sooner than this
    # Workers on this host: their processes are checked this often for exiting (0: off), so a killed
    # one leaves routing in milliseconds rather than when the kernel has closed its sockets.
    exit_poll_interval_s: float = 0.02
    # Where workers are listed: "embedded" (they register over RegisterWorker) or "consul".
    registry: str = "embedded"
    consul_address: str = "127.0.0.1:8500"
    consul_service_prefix: str = "tandem"
    consul_check_interval_s: float = 1.0  # the router's own registration's gRPC check
    consul_deregister_after_s: float = 60.0
    advertise_host: str = "127.0.0.1"  # the host Consul is given for this router

    def health_watch(self) -> HealthWatchConfig:
        return HealthWatchConfig(self.health_probe_interval_s, self.health_probe_timeout_s, self.quarantine_min_s,
                                 self.exit_poll_interval_s)

    def consul(self) -> ConsulSettings:
        return ConsulSettings(address=self.consul_address, service_prefix=self.consul_service_prefix,
                              check_interval_s=self.consul_check_interval_s,
                              deregister_after_s=self.consul_deregister_after_s)
    # "shared": a block several active requests hold counts once (memory); "per-request": each
    # request counts its whole context (attention compute), spreading hot prefixes much sooner.
    kv_decode_blocks: str = "shared"
    # Conditional disaggregation (services/router/disagg.py): prompts whose uncached part has at
    # least this many tokens are prefilled on a prefill worker when one has room.
    remote_prefill_threshold: int = 512
    enforce_disagg: bool = False  # then no prefill worker for such a prompt is an error, not a local prefill

    def disagg(self) -> DisaggSettings:
        return DisaggSettings(self.remote_prefill_threshold, self.enforce_disagg)

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
        if self.registry not in REGISTRIES:
            raise bad("registry", f"{self.registry!r} is not one of {', '.join(REGISTRIES)}")
        try:
            self.health_watch()
            if self.registry == "consul":
                self.consul()
        except ValueError as error:
            raise ValueError(str(error).replace("invalid setting", "invalid router setting", 1)) from None
        if self.kv_decode_blocks not in KV_DECODE_BLOCKS:
            raise bad("kv_decode_blocks", f"{self.kv_decode_blocks!r} is not one of {', '.join(KV_DECODE_BLOCKS)}")
        self.disagg()


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
    parser.add_argument("--health-probe-interval-s", type=float,
                        default=_env(env, "TANDEM_HEALTH_PROBE_INTERVAL_S", defaults.health_probe_interval_s),
                        help="seconds between gRPC health probes of each worker")
    parser.add_argument("--health-probe-timeout-s", type=float,
                        default=_env(env, "TANDEM_HEALTH_PROBE_TIMEOUT_S", defaults.health_probe_timeout_s),
                        help="an unanswered probe after this long takes the worker out of routing")
    parser.add_argument("--quarantine-min-s", type=float,
                        default=_env(env, "TANDEM_QUARANTINE_MIN_S", defaults.quarantine_min_s),
                        help="a failed worker is restored by a healthy probe no sooner than this")
    parser.add_argument("--exit-poll-interval-s", type=float,
                        default=_env(env, "TANDEM_EXIT_POLL_INTERVAL_S", defaults.exit_poll_interval_s),
                        help="seconds between checks that workers on this host are not exiting (0: off)")
    parser.add_argument("--registry", choices=REGISTRIES, default=_env(env, "TANDEM_REGISTRY", defaults.registry),
                        help="embedded: workers register with the router; consul: follow the catalogue")
    parser.add_argument("--consul-address", default=_env(env, "TANDEM_CONSUL_ADDRESS", defaults.consul_address),
                        help="host:port of the local Consul agent's HTTP API ($TANDEM_CONSUL_ADDRESS)")
    parser.add_argument("--consul-service-prefix", default=_env(env, "TANDEM_CONSUL_SERVICE_PREFIX",
                                                                defaults.consul_service_prefix),
                        help="services are named PREFIX-decode, PREFIX-prefill, PREFIX-router")
    parser.add_argument("--consul-check-interval-s", type=float,
                        default=_env(env, "TANDEM_CONSUL_CHECK_INTERVAL_S", defaults.consul_check_interval_s),
                        help="interval of the router's own gRPC check in Consul")
    parser.add_argument("--consul-deregister-after-s", type=float,
                        default=_env(env, "TANDEM_CONSUL_DEREGISTER_AFTER_S", defaults.consul_deregister_after_s),
                        help="Consul drops a registration critical this long (>= 60)")
    parser.add_argument("--advertise-host", default=_env(env, "TANDEM_ADVERTISE_HOST", defaults.advertise_host),
                        help="host given to Consul for this router ($TANDEM_ADVERTISE_HOST)")
    parser.add_argument("--remote-prefill-threshold", type=int,
                        default=_env(env, "TANDEM_REMOTE_PREFILL_THRESHOLD", defaults.remote_prefill_threshold),
                        help="prefill on a prefill worker when at least this many prompt tokens are uncached")
    parser.add_argument("--enforce-disagg", action="store_true",
                        default=env.get("TANDEM_ENFORCE_DISAGG", "0") == "1",
                        help="fail (UNAVAILABLE) rather than prefill on the decode worker when no prefill worker can")
    # argparse runs `type` on string defaults too, so a bad environment value is reported here.
    args = parser.parse_args(argv)
    try:
        return RouterConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port, policy=args.policy,
            worker_stale_s=args.worker_stale_s, grace_s=args.grace_s,
            kv_overlap_weight=args.kv_overlap_weight, kv_temperature=args.kv_temperature,
            kv_approximate=args.kv_approximate, kv_approx_ttl_s=args.kv_approx_ttl_s,
            kv_decode_blocks=args.kv_decode_blocks,
            health_probe_interval_s=args.health_probe_interval_s, health_probe_timeout_s=args.health_probe_timeout_s,
            quarantine_min_s=args.quarantine_min_s, exit_poll_interval_s=args.exit_poll_interval_s, registry=args.registry, consul_address=args.consul_address,
            consul_service_prefix=args.consul_service_prefix, consul_check_interval_s=args.consul_check_interval_s,
            consul_deregister_after_s=args.consul_deregister_after_s, advertise_host=args.advertise_host,
            remote_prefill_threshold=args.remote_prefill_threshold, enforce_disagg=args.enforce_disagg,
        )
    except ValueError as error:
        parser.error(str(error))
