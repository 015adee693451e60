"""Keep the worker registered with the router: one RegisterWorker stream, load reports, reconnects."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog

from services.decode.kv_publisher import KvPublisher, Outbox, RequestProgress
from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.kv.events import KvEventSource
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2

log = structlog.get_logger("decode")


class RouterRegistration:
    """Registers ``info`` and streams the load from ``load_source`` while started.

    A report goes out when the load changes (checked every ``poll_interval_s``) and at least
    every ``heartbeat_s``, which is what tells the router the stream is alive. When the router
    goes away the stream is re-opened with exponential backoff; a restarted router learns about
    the worker within one backoff step.

    With a ``kv_source`` the stream also carries the engine's KV events (and a snapshot after
    registering or when the router asks); with ``progress``, its requests' first tokens and ends.
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
        kv_source: KvEventSource | None = None,
        progress: RequestProgress | None = None,
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
        self._kv_source = kv_source
        self._progress = progress

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
        outbox: Outbox = asyncio.Queue()
        publisher = KvPublisher(self._kv_source, outbox) if self._kv_source is not None else None
        call = stub.RegisterWorker(self._messages(outbox))
        try:
            response = await call.read()
            if response is grpc.aio.EOF or not response.registered:
                return False
            if publisher is not None:
                publisher.open()
            if self._progress is not None:
                self._progress.attach(outbox)
            self._registered.set()
            log.info("registered with router", router=self.router_address, worker_id=self.info.worker_id,
                     address=self.info.address)
            # Reading on notices when the router ends or breaks the stream, and its snapshot requests.
            while (response := await call.read()) is not grpc.aio.EOF:
                if response.send_kv_snapshot and publisher is not None:
                    log.info("router asked for a KV snapshot", router=self.router_address)
                    publisher.send_snapshot()
            return True
        finally:
            self._registered.clear()
            if self._progress is not None:
                self._progress.attach(None)
            if publisher is not None:
                await publisher.close()
            call.cancel()

    async def _messages(self, outbox: Outbox) -> AsyncIterator[router_pb2.RegisterWorkerRequest]:
        yield router_pb2.RegisterWorkerRequest(register=self.info)
        last_load: worker_pb2.WorkerLoad | None = None
        last_sent_s = 0.0
        next_poll_s = 0.0
        while True:
            now = time.monotonic()
            if now >= next_poll_s:
                load = self._load_source()
                if load != last_load or now - last_sent_s >= self._heartbeat_s:
                    yield router_pb2.RegisterWorkerRequest(load=load)
                    last_load, last_sent_s = load, now
                next_poll_s = now + self._poll_interval_s
            # KV events and progress go out as soon as they are queued, between load polls.
            try:
                message = await asyncio.wait_for(outbox.get(), max(0.0, next_poll_s - time.monotonic()))
            except TimeoutError:
                continue
            yield message
            while not outbox.empty():
                yield outbox.get_nowait()
