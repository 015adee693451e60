"""``python -m services.frontend``: run the frontend until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import argparse
import os
import sys

import structlog

from services.frontend.server import FrontendConfig, serve
from tandem import lifecycle
from tandem.lifecycle import serve_until_signal
from tandem.telemetry.logging import configure_logging


def parse_args(argv: list[str] | None = None) -> FrontendConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m services.frontend", description=__doc__)
    parser.add_argument("--model", default=env("TANDEM_MODEL", ""),
                        help="local Hugging Face model directory; empty = the default model [$TANDEM_MODEL]")
    parser.add_argument("--served-model-name", default=env("TANDEM_SERVED_MODEL_NAME") or None,
                        help="the model name clients send [$TANDEM_SERVED_MODEL_NAME]")
    parser.add_argument("--host", default=env("TANDEM_FRONTEND_HOST", "0.0.0.0"))
    parser.add_argument("--http-port", type=int, default=int(env("TANDEM_FRONTEND_HTTP_PORT", "8000")))
    parser.add_argument("--grpc-port", type=int, default=int(env("TANDEM_FRONTEND_GRPC_PORT", "8001")))
    parser.add_argument("--router-address", default=env("TANDEM_ROUTER_ADDRESS", "127.0.0.1:9100"),
                        help="host:port of the router [$TANDEM_ROUTER_ADDRESS]")
    parser.add_argument("--request-timeout-s", type=float,
                        default=float(env("TANDEM_REQUEST_TIMEOUT_S", "600")),
                        help="deadline for one request; 0 = none [$TANDEM_REQUEST_TIMEOUT_S]")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length; default: the model's max_position_embeddings")
    parser.add_argument("--shutdown-grace-s", type=float, default=10.0,
                        help="how long in-flight requests may finish on SIGTERM")
    parser.add_argument("--migration-limit", type=int, default=int(env("TANDEM_MIGRATION_LIMIT", "3")),
                        help="times a request may move to another worker after a failure [$TANDEM_MIGRATION_LIMIT]")
    parser.add_argument("--stall-timeout-s", type=float, default=float(env("TANDEM_STALL_TIMEOUT_S", "5")),
                        help="no token for this long while running: the worker is hung, its requests "
                             "migrate; 0 = off [$TANDEM_STALL_TIMEOUT_S]")
    parser.add_argument("--first-token-timeout-s", type=float,
                        default=float(env("TANDEM_FIRST_TOKEN_TIMEOUT_S", "0")),
                        help="the same before the first token; 0 = off [$TANDEM_FIRST_TOKEN_TIMEOUT_S]")
    parser.add_argument("--max-inflight-requests", type=int,
                        default=int(env("TANDEM_MAX_INFLIGHT_REQUESTS", "1024")),
                        help="requests at the workers at once [$TANDEM_MAX_INFLIGHT_REQUESTS]")
    parser.add_argument("--max-queued-requests", type=int, default=int(env("TANDEM_MAX_QUEUED_REQUESTS", "1024")),
                        help="requests waiting beyond that; more get 503 + Retry-After [$TANDEM_MAX_QUEUED_REQUESTS]")
    parser.add_argument("--queue-timeout-s", type=float, default=float(env("TANDEM_QUEUE_TIMEOUT_S", "30")),
                        help="longest wait in the queue [$TANDEM_QUEUE_TIMEOUT_S]")
    parser.add_argument("--route-prediction", action=argparse.BooleanOptionalAction,
                        default=env("TANDEM_ROUTE_PREDICTION", "1") != "0",
                        help="start a request on the model's only worker while its Route is on the way, when "
                             "the router said no other worker could be chosen [$TANDEM_ROUTE_PREDICTION=0 turns "
                             "it off]")
    parser.add_argument("--worker-streams", action=argparse.BooleanOptionalAction,
                        default=env("TANDEM_WORKER_STREAMS", "1") != "0",
                        help="send requests to each worker over one GenerateStream, which carries a step's "
                             "outputs for all of them in one message; off: a Generate call per request "
                             "[$TANDEM_WORKER_STREAMS=0 turns it off]")
    parser.add_argument("--retry-after-s", type=int, default=int(env("TANDEM_RETRY_AFTER_S", "1")),
                        help="Retry-After seconds on 503 answers [$TANDEM_RETRY_AFTER_S]")
    parser.add_argument("--registry", choices=("embedded", "consul"), default=env("TANDEM_REGISTRY", "embedded"),
                        help="consul: list this frontend in the local Consul agent [$TANDEM_REGISTRY]")
    parser.add_argument("--consul-address", default=env("TANDEM_CONSUL_ADDRESS", "127.0.0.1:8500"),
                        help="host:port of the local Consul agent's HTTP API [$TANDEM_CONSUL_ADDRESS]")
    parser.add_argument("--consul-service-prefix", default=env("TANDEM_CONSUL_SERVICE_PREFIX", "tandem"),
                        help="the service is named PREFIX-frontend [$TANDEM_CONSUL_SERVICE_PREFIX]")
    parser.add_argument("--advertise-host", default=env("TANDEM_ADVERTISE_HOST", "127.0.0.1"),
                        help="host given to Consul for this frontend [$TANDEM_ADVERTISE_HOST]")
    args = parser.parse_args(argv)
    return FrontendConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host,
        http_port=args.http_port, grpc_port=args.grpc_port, router_address=args.router_address,
        request_timeout_s=args.request_timeout_s or None, max_model_len=args.max_model_len,
        shutdown_grace_s=args.shutdown_grace_s, migration_limit=args.migration_limit,
        stall_timeout_s=args.stall_timeout_s or None, first_token_timeout_s=args.first_token_timeout_s or None,
        max_inflight_requests=args.max_inflight_requests, max_queued_requests=args.max_queued_requests,
        queue_timeout_s=args.queue_timeout_s, registry=args.registry, consul_address=args.consul_address,
        consul_service_prefix=args.consul_service_prefix, advertise_host=args.advertise_host,
        retry_after_s=args.retry_after_s, predict_routes=args.route_prediction,
        worker_streams=args.worker_streams,
    )


async def run(config: FrontendConfig) -> None:
    await serve_until_signal(lambda: serve(config),
                             on_signal=lambda: structlog.get_logger(__name__).info("signal received; draining"))


def main(argv: list[str] | None = None) -> int:
    configure_logging("frontend")
    try:
        config = parse_args(argv)
    except ValueError as exc:  # a setting FrontendConfig rejected, named in the message
        print(f"frontend: {exc}", file=sys.stderr)
        return 2
    try:
        lifecycle.run(run(config))
    except ValueError as exc:  # TANDEM_EVENT_LOOP, named in the message
        print(f"frontend: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
