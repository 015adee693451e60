"""Tandem: a disaggregated LLM serving mesh of gRPC microservices."""

import os

__version__ = "0.1.0"

# gRPC's I/O for Tandem's processes. grpcio 1.85 (pinned) moves every message through its
# EventEngine's threads before the completion queue that grpc.aio polls; with its older poller the
# queue's own thread reads the socket, one thread handoff fewer per message and per side. On a 2-core
# host a 100-byte ping-pong over an idle stream took 0.73 ms against 0.92, and the mesh's TTFT at
# concurrency 1 was 1.5-2% lower (benchmarks/load.py; README, Configuration). grpc reads this once,
# when it is first imported, so it is set here, before any Tandem module imports grpc; an operator's
# own GRPC_EXPERIMENTS wins (GRPC_EXPERIMENTS= keeps every gRPC default).
GRPC_EXPERIMENTS_DEFAULT = ",".join(f"-{name}" for name in (
    "event_engine_client", "event_engine_listener", "event_engine_for_all_other_endpoints",
    "event_engine_callback_cq"))
os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS_DEFAULT)
