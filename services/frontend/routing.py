"""Per-request routing knobs from an OpenAI body's extra field ``routing`` (``extra_body`` in clients).

Example: ``{"routing": {"kv_overlap_weight": 2.0, "kv_temperature": 0.1}}``; unset keys keep the
router's configuration.
"""

from __future__ import annotations

import math
from typing import Any

from tandem.errors import InvalidRequest
from tandem.proto.router.v1 import router_pb2

_FIELDS = ("kv_overlap_weight", "kv_temperature")


def parse_routing_overrides(body: Any) -> router_pb2.RoutingOverrides | None:
    """The body's ``routing`` object as RouteRequest overrides; None when absent."""
    routing = body.get("routing") if isinstance(body, dict) else None
    if routing is None:
        return None
    if not isinstance(routing, dict):
        raise InvalidRequest("routing must be an object", "routing")
    unknown = sorted(set(routing) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(f"routing.{unknown[0]} is not a routing setting (known: {', '.join(_FIELDS)})",
                             f"routing.{unknown[0]}")
    overrides = router_pb2.RoutingOverrides()
    for name in _FIELDS:
        value = routing.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise InvalidRequest(f"routing.{name} must be a number >= 0, got {value!r}", f"routing.{name}")
        setattr(overrides, name, float(value))
    return overrides
