"""Consul as the registry: a service registers itself with a gRPC health check that the Consul agent
runs, and deregisters on shutdown; the router follows the catalogue (services/router/consul_registry.py).

Only the agent HTTP API is used (py-consul's asyncio client), so a small fake of those endpoints
(tests/integration/fake_consul.py) stands in for Consul in tests.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

import aiohttp
import consul
import consul.aio
import structlog

log = structlog.get_logger(__name__)

SERVICE_PREFIX = "tandem"  # services are named tandem-decode, tandem-prefill, tandem-router, ...
REGISTRIES = ("embedded", "consul")


def host_port(address: str, setting: str) -> tuple[str, int]:
    """Split ``host:port``; raises ValueError naming ``setting``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"invalid setting {setting}: must be host:port, got {address!r}")
    return host, int(port)


@dataclass(slots=True, frozen=True)
class ConsulSettings:
    address: str = "127.0.0.1:8500"  # the local Consul agent's HTTP API
    service_prefix: str = SERVICE_PREFIX
    check_interval_s: float = 1.0  # how often the agent runs each service's gRPC health check
    check_timeout_s: float = 1.0
    # A service whose check stays critical this long is removed from the catalogue by the agent.
    deregister_after_s: float = 60.0
    token: str | None = field(default=None, repr=False)  # ACL token, when the agent needs one

    def __post_init__(self) -> None:
        host_port(self.address, "consul_address")
        if not self.service_prefix:
            raise ValueError("invalid setting consul_service_prefix: must not be empty")
        for name in ("check_interval_s", "check_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"invalid setting consul_{name}: must be > 0, got {getattr(self, name)}")
        # Consul refuses DeregisterCriticalServiceAfter below one minute (it rounds it up).
        if not self.deregister_after_s >= 60:
            raise ValueError(f"invalid setting consul_deregister_after_s: must be >= 60, got {self.deregister_after_s}")

    def service_name(self, role: str) -> str:
        return f"{self.service_prefix}-{role}"

    def client(self) -> consul.aio.Consul:
        """A new asyncio client; the caller closes it (``await client.close()``)."""
        host, port = host_port(self.address, "consul_address")
        # Plain HTTP to the local agent (an agent runs beside each service), so no TLS context.
        return consul.aio.Consul(host=host, port=port, token=self.token, scheme="http", verify=False)


def _duration(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


class ConsulRegistration:
    """Registers one service instance with the local agent while started; same shape as the router
    stream's ``RouterRegistration`` (start, stop, registered, wait_registered), so services swap them.

    The agent runs a gRPC health check against ``address``; Consul lists the instance as passing only
    while that check answers SERVING, so NOT_SERVING (loading, draining, engine failed) takes it out
    of routing without any call from here.
    """

    def __init__(self, settings: ConsulSettings, *, role: str, service_id: str, address: str,
                 meta: dict[str, str], retry_initial_s: float = 0.1, retry_max_s: float = 5.0) -> None:
        self.settings = settings
        self.role = role
        self.service_id = service_id
        self.address = address
        self.meta = meta
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def wait_registered(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._register_until_done(), name="consul-registration")

    async def stop(self) -> None:
        """Deregister, so the catalogue drops the instance now rather than after failing checks."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        if not self._registered.is_set():
            return
        self._registered.clear()
        client = self.settings.client()
        try:
            await client.agent.service.deregister(self.service_id)
            log.info("deregistered from consul", service_id=self.service_id)
        except (aiohttp.ClientError, consul.ConsulException, OSError) as error:
            # The check will fail once this process is gone; the agent removes it after deregister_after_s.
            log.warning("consul deregistration failed", service_id=self.service_id, error=str(error))
        finally:
            await client.close()

    async def _register_until_done(self) -> None:
        settings = self.settings
        host, port = host_port(self.address, "address")
        check = consul.Check.grpc(
            self.address, _duration(settings.check_interval_s), timeout=_duration(settings.check_timeout_s),
            deregister=_duration(settings.deregister_after_s),
        )
        retry_s = self._retry_initial_s
        client = settings.client()
        try:
            while True:
                try:
                    await client.agent.service.register(
                        settings.service_name(self.role), service_id=self.service_id, address=host, port=port,
                        tags=[self.role], meta=self.meta, check=check,
                    )
                except (aiohttp.ClientError, consul.ConsulException, OSError) as error:
                    log.warning("consul unreachable; retrying", agent=settings.address, error=str(error),
                                retry_in_s=round(retry_s, 2))
                    await asyncio.sleep(retry_s * random.uniform(0.5, 1.0))
                    retry_s = min(retry_s * 2, self._retry_max_s)
                    continue
                self._registered.set()
                log.info("registered with consul", agent=settings.address, service=settings.service_name(self.role),
                         service_id=self.service_id, address=self.address)
                return
        finally:
            await client.close()
