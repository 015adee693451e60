"""FakeConsulAgent: the few Consul agent HTTP endpoints Tandem uses, served by aiohttp on port 0.

Like a real agent it runs each registered service's gRPC health check itself (every interval, with
its timeout), lists an instance as passing only while that check passes (new checks start
critical), answers blocking queries (``index`` + ``wait``) when the passing set changes, and drops
services critical for longer than their DeregisterCriticalServiceAfter. ``force_check`` pins a
check's status, for tests that need a failing check without a failing service.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

PASSING, CRITICAL = "passing", "critical"
_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Consul's Go-style durations as py-consul sends them: "500ms", "10s", "1m"."""
    match = re.fullmatch(r"([0-9.]+)(ms|s|m|h)", text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r}")
    return float(match.group(1)) * _UNITS_S[match.group(2)]


@dataclass
class _Service:
    service_id: str
    name: str
    address: str
    port: int
    tags: list[str]
    meta: dict[str, str]
    grpc_target: str | None
    interval_s: float
    timeout_s: float
    deregister_after_s: float | None
    status: str = CRITICAL
    forced: str | None = None
    critical_since: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class FakeConsulAgent:
    """``await start()`` then point ConsulSettings at ``address``; ``await stop()`` at the end."""

    def __init__(self) -> None:
        self.services: dict[str, _Service] = {}
        self.index = 1
        self.num_blocking_queries = 0
        self._changed = asyncio.Event()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self._deregister)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.address = f"127.0.0.1:{port}"

    async def stop(self) -> None:
        self._closing = True
        self._changed.set()  # ends the blocking queries still waiting
        for service in list(self.services.values()):
            await self._drop(service.service_id)
        if self._runner is not None:
            await self._runner.cleanup()

    # -- test hooks --------------------------------------------------------------------------

    def force_check(self, service_id: str, status: str | None) -> None:
        """Pin a check's status (None: back to the real check's verdict at its next run)."""
        service = self.services[service_id]
        service.forced = status
        if status is not None:
            self._set_status(service, status)

    def passing(self, name: str) -> list[str]:
        return sorted(s.service_id for s in self.services.values() if s.name == name and s.status == PASSING)

    # -- the agent API -----------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        checks = body.get("checks") or ([body["check"]] if body.get("check") else [])
        check = checks[0] if checks else {}
        service_id = body.get("id") or body["name"]
        await self._drop(service_id)  # re-registration replaces
        deregister = check.get("DeregisterCriticalServiceAfter")
        service = _Service(
            service_id=service_id, name=body["name"], address=body.get("address", "127.0.0.1"),
            port=int(body.get("port", 0)), tags=list(body.get("tags") or []), meta=dict(body.get("meta") or {}),
            grpc_target=check.get("grpc"), interval_s=parse_duration(check.get("interval", "10s")),
            timeout_s=parse_duration(check.get("timeout", "10s")),
            deregister_after_s=parse_duration(deregister) if deregister else None,
            status=CRITICAL if check else PASSING,
        )
        self.services[service_id] = service
        if service.grpc_target:
            service.critical_since = asyncio.get_running_loop().time()
            service.task = asyncio.create_task(self._run_check(service))
        self._bump()
        return web.json_response(True)

    async def _deregister(self, request: web.Request) -> web.Response:
        await self._drop(request.match_info["service_id"])
        return web.json_response(True)

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        index = int(request.query.get("index", "0") or 0)
        if index and index >= self.index:  # a blocking query: wait for a change or the wait time
            self.num_blocking_queries += 1
            wait_s = parse_duration(request.query.get("wait", "300s"))
            with contextlib.suppress(TimeoutError):
                while index >= self.index and not self._closing:
                    await asyncio.wait_for(self._changed.wait(), wait_s)
        passing_only = "passing" in request.query
        body = [self._entry(s) for s in self.services.values()
                if s.name == name and (not passing_only or s.status == PASSING)]
        return web.json_response(body, headers={"X-Consul-Index": str(self.index)})

    # -- internals ---------------------------------------------------------------------------

    def _entry(self, service: _Service) -> dict[str, Any]:
        return {
            "Node": {"Node": "fake-node", "Address": "127.0.0.1"},
            "Service": {"ID": service.service_id, "Service": service.name, "Tags": service.tags,
                        "Address": service.address, "Port": service.port, "Meta": service.meta},
            "Checks": [{"Node": "fake-node", "CheckID": f"service:{service.service_id}", "Status": service.status,
                        "ServiceID": service.service_id, "ServiceName": service.name, "Output": ""}],
        }

    def _bump(self) -> None:
        self.index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_status(self, service: _Service, status: str) -> None:
        loop_time = asyncio.get_running_loop().time()
        if status == CRITICAL and service.critical_since is None:
            service.critical_since = loop_time
        elif status == PASSING:
            service.critical_since = None
        if status != service.status:
            service.status = status
            self._bump()

    async def _drop(self, service_id: str) -> None:
        service = self.services.pop(service_id, None)
        if service is None:
            return
        if service.task is not None and service.task is not asyncio.current_task():
            service.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await service.task
        self._bump()

    async def _run_check(self, service: _Service) -> None:
        assert service.grpc_target is not None
        target, _, health_service = service.grpc_target.partition("/")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=health_service),
                                             timeout=service.timeout_s)
                    verdict = PASSING if reply.status == health_pb2.HealthCheckResponse.SERVING else CRITICAL
                except grpc.aio.AioRpcError:
                    verdict = CRITICAL
                self._set_status(service, service.forced or verdict)
                now = asyncio.get_running_loop().time()
                if (service.deregister_after_s is not None and service.critical_since is not None
                        and now - service.critical_since >= service.deregister_after_s):
                    await self._drop(service.service_id)
                    return
                await asyncio.sleep(service.interval_s)
