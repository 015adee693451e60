"""Keep the worker registered with the router: one RegisterWorker stream, load reports, reconnects."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog

from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2

log = structlog.get_logger("decode")


class RouterRegistration:
    """Registers ``info`` and streams the load from ``load_source`` while started.

    A report goes out when the load changes (checked every ``poll_interval_s``) and at least
    every ``heartbeat_s``, which is what tells the router the stream is alive. When the router
    goes away the stream is re-opened with exponential backoff; a restarted router learns about
    the worker within one backoff step.
    """

    def __init__(
        self,
        router_address: str,
        info: router_pb2.WorkerInfo,
        load_source: Callable[[], worker_pb2.WorkerLoad],
        *,
        poll_interval_s: float = 0.1,
        heartbeat_s: float = 1.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.router_address = router_address
        self.info = info
        self._load_source = load_source
        self._poll_interval_s = poll_interval_s
        self._heartbeat_s = heartbeat_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    async def wait_registered(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._registered.wait(), timeout_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="router-registration")

    async def stop(self) -> None:
        """Close the stream, which removes the worker from the router at once."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._registered.clear()

    async def _run(self) -> None:
        backoff_s = self._backoff_initial_s
        async with grpc.aio.insecure_channel(self.router_address, options=CHANNEL_OPTIONS) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            while True:
                try:
                    if await self._session(stub):
                        backoff_s = self._backoff_initial_s
                    log.warning("router ended the registration stream", router=self.router_address)
                except grpc.aio.AioRpcError as error:
                    log.warning("router unreachable; retrying", router=self.router_address,
                                code=error.code().name, details=error.details(), retry_in_s=round(backoff_s, 2))
                except Exception:  # keep the worker registrable whatever went wrong this time
                    log.exception("registration failed; retrying", router=self.router_address)
                # Jitter spreads the reconnects of many workers after a router restart.
                await asyncio.sleep(backoff_s * random.uniform(0.5, 1.0))
                backoff_s = min(backoff_s * 2, self._backoff_max_s)

    async def _session(self, stub: router_pb2_grpc.RouterServiceStub) -> bool:
        """One stream's life; True if the router accepted the registration before it ended."""
        call = stub.RegisterWorker(self._messages())
        try:
            response = await call.read()
            if response is grpc.aio.EOF or not response.registered:
                return False
            self._registered.set()
            log.info("registered with router", router=self.router_address, worker_id=self.info.worker_id,
                     address=self.info.address)
            # The router answers once; reading on notices when it ends or breaks the stream.
            while await call.read() is not grpc.aio.EOF:
                pass
            return True
        finally:
            self._registered.clear()
            call.cancel()

    async def _messages(self) -> AsyncIterator[router_pb2.RegisterWorkerRequest]:
        yield router_pb2.RegisterWorkerRequest(register=self.info)
        last_load: worker_pb2.WorkerLoad | None = None
        last_sent_s = 0.0
        while True:
            load = self._load_source()
            now = time.monotonic()
            if load != last_load or now - last_sent_s >= self._heartbeat_s:
                yield router_pb2.RegisterWorkerRequest(load=load)
                last_load, last_sent_s = load, now
            await asyncio.sleep(self._poll_interval_s)
