"""Remote prefill on the decode worker: the prefill worker runs the prompt, this worker imports the KV.

Flow per request with a prefill hint: reserve blocks here (local prefix hits need no transfer);
if enough of the prompt is missing, call Prefill on the prefill worker, stream its first token to
the client at once, pull the missing blocks into the reservation, release them on the prefill
worker, decode. Any failure before the first token means a local prefill; a failed pull after it
means a local prefill with the same first token (the engine's fallback), so the output is the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import structlog

from services.decode.config import DecodeConfig
from services.decode.pull_helper import pull_helper_args
from tandem.engine.types import EngineRequest, KVReservation, RequestOutput
from tandem.kv.transfer.children import HelperProcesses
from tandem.kv.transfer.host import host_id
from tandem.kv.transfer.metrics import PullMetrics
from tandem.kv.transfer.protocol import ImportingEngine, KvPuller, KvTransferError, TransferHandle
from tandem.kv.transfer.pull import ChannelPool, GrpcKvPuller, PullHelpers
from tandem.kv.transfer.shm import SegmentReader
from tandem.kv.transfer.shm_pull import ShmKvPuller
from tandem.kv.transfer.sweep import sweep_orphans
from tandem.kv.transfer.wire import handle_from_proto
from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2
from tandem.telemetry.logging import REQUEST_ID_HEADER
from tandem.wire import logprob_from_proto

log = structlog.get_logger("decode")

_RELEASE_TIMEOUT_S = 5.0


@dataclass(slots=True)
class _ReservationSink:
    """Writes verified chunks into the reserved blocks (the KvSink of one import)."""

    engine: ImportingEngine
    reservation: KVReservation
    pool_shared: bool = False  # the engine's pool is the one the pull helpers map

    def target_block_ids(self, block_index: int, count: int) -> Sequence[int] | None:
        if not self.pool_shared:
            return None
        return self.reservation.block_ids[block_index : block_index + count]

    def write(self, block_index: int, layer_start: int, data: object) -> None:
        self.engine.write_kv(self.reservation, block_index, layer_start, data)  # type: ignore[arg-type]

    def copy_from_pool(self, block_index: int, source_k: object, source_v: object,
                       source_block_ids: Sequence[int]) -> None:
        self.engine.import_kv_blocks(self.reservation, block_index, source_k, source_v,  # type: ignore[arg-type]
                                     source_block_ids)


@dataclass(slots=True)
class _Transfer:
    handle: TransferHandle
    released: bool = False


class RemotePrefill:
    """The decode worker's side of disaggregation; one per worker, shared by all its requests."""

    def __init__(self, engine: ImportingEngine, config: DecodeConfig, metrics: PullMetrics) -> None:
        self._engine = engine
        self._config = config
        self._metrics = metrics
        self._host_id = host_id(config.shm_dir)
        settings = config.pull_settings()
        self.grpc_puller = GrpcKvPuller(settings, ChannelPool(settings.num_streams))
        self.shm_puller = ShmKvPuller(settings, ChannelPool(1), SegmentReader(config.shm_dir))
        self._control = ChannelPool(1)  # Prefill and ReleaseKv calls
        self._releases: set[asyncio.Task[None]] = set()
        self._helpers: HelperProcesses | None = None
        self._close_pool: Callable[[], None] | None = None
        # Test hook: awaited with the handle before each pull (fault tests stop the prefill worker here).
        self.before_pull: Callable[[TransferHandle], Awaitable[None]] | None = None

    def note_local(self, reason: str) -> None:
        self._metrics.observe_prefill("local", reason)

    async def start_helpers(self) -> None:
        """With ``kv_pull_processes``: move the engine's pool into shared memory and start the pull
        helpers over it (after the engine started). Not for pools outside host memory."""
        count = self._config.kv_pull_processes
        share = getattr(self._engine, "share_kv_pool", None)
        if count and share is not None:
            # A pool file a killed decode worker of this PID namespace left behind goes first.
            await asyncio.to_thread(sweep_orphans, self._config.shm_dir)
        pool = await share(self._config.shm_dir) if count and share is not None else None
        if pool is None:
            if count:
                log.warning("no pull helpers: the KV pool is not in host memory; this process pulls")
            return
        self._close_pool = pool.close
        helpers = HelperProcesses("services.decode.pull_helper",
                                  pull_helper_args(self._config.shm_dir, pool.info, self._engine.kv_layout()), count)
        ports = await helpers.start()
        self._helpers = helpers
        self.grpc_puller.helpers = PullHelpers([f"127.0.0.1:{port}" for port in ports], helpers.alive, helpers.kill,
                                                helpers.token)
        log.info("KV pull helpers serving", pids=helpers.pids)

    @property
    def helper_pids(self) -> list[int]:
        return self._helpers.pids if self._helpers is not None else []

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self.grpc_puller.close()
        await self.shm_puller.close()
        await self._control.close()
        if self._helpers is not None:
            await self._helpers.close()
        if self._close_pool is not None:
            self._close_pool()  # removes the file; the engine's mapping stays until it stops

    async def generate(self, request: EngineRequest, wire: worker_pb2.GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The outputs of ``request`` (``wire`` carries its prefill hint), prefilled remotely when that pays.

        Raises like ``Engine.generate`` before the first output.
        """
        hint = wire.prefill
        if request.sampling.prompt_logprobs is not None:  # scored here: the prompt's logits stay here
            async for output in self._local(request, "prompt_logprobs"):
                yield output
            return
        reservation = await self._engine.reserve_kv(request)  # validates like generate()
        if reservation is None:
            async for output in self._local(request, "pool_full"):
                yield output
            return
        num_missing = len(request.prompt_token_ids) - reservation.num_cached_tokens
        if num_missing < hint.min_remote_prefill_tokens:
            await self._engine.cancel_reservation(reservation)
            async for output in self._local(request, "short_prompt"):
                yield output
            return
        try:
            prefilled, lease_deadline_s = await self._prefill(hint.address, request, wire)
        except (grpc.aio.AioRpcError, KvTransferError) as error:
            await self._engine.cancel_reservation(reservation)
            reason = error.code().name if isinstance(error, grpc.aio.AioRpcError) else error.reason
            log.warning("remote prefill failed; prefilling here", prefill_worker=hint.worker_id, error=reason)
            async for output in self._local(request, "prefill_failed"):
                yield output
            return
        except BaseException:
            await asyncio.shield(self._engine.cancel_reservation(reservation))
            raise
        self._metrics.observe_prefill("remote")
        transfer = (_Transfer(handle_from_proto(prefilled.handle, hint.address, lease_deadline_s))
                    if prefilled.HasField("handle") else None)

        async def load_kv(reserved: KVReservation) -> None:
            assert transfer is not None  # load_kv is only given when there is a handle
            await self._load(transfer, reserved)

        first_logprob = (logprob_from_proto(prefilled.first_token_logprob)
                         if prefilled.HasField("first_token_logprob") else None)
        outputs = self._engine.generate_imported(request, reservation, prefilled.first_token_id,
                                                 load_kv if transfer is not None else None, first_logprob)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]
            if transfer is not None and not transfer.released:
                self._release_soon(transfer)  # e.g. the client left before the pull

    async def _local(self, request: EngineRequest, reason: str) -> AsyncIterator[RequestOutput]:
        self.note_local(reason)
        outputs = self._engine.generate(request)  # type: ignore[attr-defined]
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()

    async def _prefill(self, address: str, request: EngineRequest,
                       wire: worker_pb2.GenerateRequest) -> tuple[kv_pb2.PrefillResponse, float]:
        """The response, and the time (``time.monotonic()``) before which its lease surely holds."""
        stub = kv_pb2_grpc.PrefillServiceStub(self._control.get(address)[0])
        started = time.perf_counter()
        sent_at = time.monotonic()  # the lease starts after this
        response: kv_pb2.PrefillResponse = await stub.Prefill(
            kv_pb2.PrefillRequest(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                                  sampling=wire.sampling,
                                  num_resumed_output_tokens=request.num_resumed_output_tokens),
            metadata=((REQUEST_ID_HEADER, request.request_id),), timeout=self._config.prefill_timeout_s)
        log.info("remote prefill done", prefill_address=address,
                 duration_ms=round(1000 * (time.perf_counter() - started), 1), num_prompt_tokens=response.num_prompt_tokens, num_cached_tokens=response.num_cached_tokens)
        return response, sent_at + response.handle.lease_ms / 1000

    def _puller(self, handle: TransferHandle) -> KvPuller:
        choice = self._config.kv_transport
        if choice == "shm" or (choice == "auto" and handle.host_id == self._host_id):
            return self.shm_puller
        return self.grpc_puller

    async def _load(self, transfer: _Transfer, reservation: KVReservation) -> None:
        """``generate_imported``'s load_kv: pull the missing blocks, then release them on the prefill worker."""
        handle = transfer.handle
        try:
            if handle.layout != self._engine.kv_layout() or handle.num_blocks != len(reservation.block_ids):
                raise KvTransferError(f"the prefill worker's KV ({handle.layout}, {handle.num_blocks} blocks) does "
                                      f"not fit this worker's ({self._engine.kv_layout()}, "
                                      f"{len(reservation.block_ids)} blocks)", "layout")
            if self.before_pull is not None:
                await self.before_pull(handle)
            sink = _ReservationSink(self._engine, reservation, pool_shared=self._helpers is not None)
            puller = self._puller(handle)
            try:
                result = await puller.pull(handle, reservation.first_missing_block, sink,
                                           timeout_s=self._config.kv_transfer_timeout_s)
            except KvTransferError as error:
                if puller is not self.shm_puller or error.reason != "shm":
                    raise
                log.warning("shared-memory transfer failed; pulling over gRPC", error=str(error))
                result = await self.grpc_puller.pull(handle, reservation.first_missing_block, sink,
                                                     timeout_s=self._config.kv_transfer_timeout_s)
        except KvTransferError as error:
            self._metrics.failures.labels(reason=error.reason).inc()
            self.note_local("import_failed")
            log.warning("KV transfer failed; prefilling here with the same first token", reason=error.reason,
                        error=str(error), transfer_id=handle.transfer_id)
            self._release_soon(transfer)
            raise
        except Exception as error:
            self._metrics.failures.labels(reason="error").inc()
            self.note_local("import_failed")
            log.exception("KV transfer failed", transfer_id=handle.transfer_id, error=str(error))
            self._release_soon(transfer)
            raise
        # Release first, so the prefill worker frees its blocks before this request decodes.
        self._release_soon(transfer)
        self._metrics.observe_pull(result)
        log.info("KV transfer done", transport=result.transport, transfer_id=handle.transfer_id,
                 num_bytes=result.num_bytes, num_chunks=result.num_chunks,
                 first_block=reservation.first_missing_block, num_blocks=handle.num_blocks,
                 duration_ms=round(1000 * result.duration_s, 2), gigabytes_per_s=round(result.gigabytes_per_s, 2),
                 num_retried_chunks=result.num_retried_chunks)

    def _release_soon(self, transfer: _Transfer) -> None:
        """Send ReleaseKv in the background: it must go out even when the request was cancelled."""
        if transfer.released:
            return
        transfer.released = True
        task = asyncio.get_running_loop().create_task(self._release(transfer.handle))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, handle: TransferHandle) -> None:
        stub = kv_pb2_grpc.PrefillServiceStub(self._control.get(handle.address)[0])
        try:
            await stub.ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=handle.transfer_id), timeout=_RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:  # the lease frees the blocks anyway
            log.info("ReleaseKv failed; the prefill worker's lease will free the blocks",
                     transfer_id=handle.transfer_id, code=error.code().name)
