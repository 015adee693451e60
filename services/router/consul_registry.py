"""The Consul registry backend: the router follows the catalogue's passing instances of each worker
role with blocking queries, and polls each worker's GetStats for its load (Consul carries no load)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import consul
import grpc
import structlog

from services.router.registry import WorkerInfo, WorkerLoad, WorkerRole, WorkerSnapshot
from tandem.discovery.consul import ConsulSettings
from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.procinfo import process_from_meta
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

log = structlog.get_logger("router")

_RETRY_MAX_S = 5.0


@dataclass(slots=True)
class _Entry:
    info: WorkerInfo
    load: WorkerLoad = field(default_factory=WorkerLoad)
    num_routed_since_report: int = 0


def info_from_entry(entry: dict[str, Any], role: WorkerRole) -> WorkerInfo:
    """A worker as its Consul service entry (``/v1/health/service``) describes it."""
    service = entry["Service"]
    meta = service.get("Meta") or {}
    host = service.get("Address") or entry.get("Node", {}).get("Address", "")
    return WorkerInfo(
        worker_id=service["ID"], role=role, address=f"{host}:{service['Port']}", model=meta.get("model", ""),
        max_model_len=int(meta.get("max_model_len", 0) or 0), block_size=int(meta.get("block_size", 0) or 0),
        process=process_from_meta(meta),
    )


class ConsulRegistry:
    """A ``WorkerRegistry`` whose workers are the catalogue's passing instances; single event loop only.

    Consul says which instances pass their gRPC check; the router's health monitor still watches each
    one, because a check runs only every few seconds while a killed worker should leave routing at once.
    """

    def __init__(self, settings: ConsulSettings, *, roles: Sequence[WorkerRole] = (WorkerRole.DECODE,
                                                                                   WorkerRole.PREFILL),
                 wait_s: float = 10.0, load_poll_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._roles = tuple(roles)
        self._wait_s = wait_s
        self._load_poll_interval_s = load_poll_interval_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._synced: dict[WorkerRole, asyncio.Event] = {role: asyncio.Event() for role in self._roles}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._follow(role), name=f"consul-{role.value}")
                           for role in self._roles]
            self._tasks.append(asyncio.create_task(self._poll_loads(), name="consul-loads"))

    async def wait_synced(self, timeout_s: float) -> None:
        """Until every role's first catalogue answer is in (tests, start-up logs)."""
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in self._synced.values())), timeout_s)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- WorkerRegistry ----------------------------------------------------------------------

    def snapshot(self) -> list[WorkerSnapshot]:
        return [WorkerSnapshot(info=entry.info, load=entry.load, num_routed_since_report=entry.num_routed_since_report)
                for entry in self._entries.values()]

    def note_routed(self, worker_id: str) -> None:
        entry = self._entries.get(worker_id)
        if entry is not None:
            entry.num_routed_since_report += 1

    # -- following the catalogue -------------------------------------------------------------

    def apply_catalogue(self, role: WorkerRole, entries: list[dict[str, Any]]) -> None:
        """Replace the workers of ``role`` with the passing instances in ``entries``."""
        infos: dict[str, WorkerInfo] = {}
        for item in entries:
            try:
                info = info_from_entry(item, role)
            except (KeyError, ValueError, TypeError) as error:
                log.warning("skipping a malformed consul entry", error=repr(error))
                continue
            infos[info.worker_id] = info
        for worker_id in [w for w, e in self._entries.items() if e.info.role is role and w not in infos]:
            del self._entries[worker_id]
            log.info("worker left the consul catalogue", worker_id=worker_id)
        for worker_id, info in infos.items():
            known = self._entries.get(worker_id)
            if known is None or known.info != info:
                self._entries[worker_id] = _Entry(info)
                log.info("worker joined from the consul catalogue", worker_id=worker_id, address=info.address)
        self._synced[role].set()

    async def _follow(self, role: WorkerRole) -> None:
        """Blocking queries: each returns when the passing set changes or after ``wait_s``."""
        name = self._settings.service_name(role.value)
        index: str | None = None
        retry_s = 0.1
        client = self._settings.client()
        try:
            while True:
                try:
                    new_index, entries = await client.health.service(
                        name, index=index, wait=f"{self._wait_s:g}s", passing=True)
                except (aiohttp.ClientError, consul.ConsulException, OSError, ValueError) as error:
                    # Keep the last known workers: the agent being away says nothing about them.
                    log.warning("consul query failed; retrying", service=name, error=str(error),
                                retry_in_s=round(retry_s, 2))
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, _RETRY_MAX_S)
                    continue
                retry_s = 0.1
                # An index that goes backwards (agent restarted) must not be waited on: start over.
                if index is not None and new_index is not None and int(new_index) < int(index):
                    new_index = None
                index = new_index
                self.apply_catalogue(role, entries or [])
        finally:
            await client.close()

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.gather(*(self._poll_load(worker_id, entry.info.address)
                                   for worker_id, entry in list(self._entries.items())))
            for address in set(self._channels) - {entry.info.address for entry in self._entries.values()}:
                await self._channels.pop(address).close()
            await asyncio.sleep(self._load_poll_interval_s)

    async def _poll_load(self, worker_id: str, address: str) -> None:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        try:
            reply = await worker_pb2_grpc.WorkerServiceStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=self._load_poll_interval_s * 2)
        except grpc.aio.AioRpcError:
            return  # the health monitor decides what a silent worker means
        entry = self._entries.get(worker_id)
        if entry is not None and entry.info.address == address:
            load = reply.load
            entry.load = WorkerLoad(
                num_running=load.num_running, num_waiting=load.num_waiting,
                num_kv_blocks_used=load.num_kv_blocks_used, num_kv_blocks_total=load.num_kv_blocks_total,
                num_free_queue_slots=load.num_free_queue_slots,
            )
            entry.num_routed_since_report = 0
