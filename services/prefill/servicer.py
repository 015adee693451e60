"""The PrefillService handlers: Prefill pins a prompt's KV under a lease, PullKv streams it, ReleaseKv frees it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc
import structlog

from tandem.engine.types import EngineRequest, FinishReason, KVLayout
from tandem.errors import InvalidRequest, ResourceExhausted, TandemError
from tandem.grpc_server import bind_request_id, request_id_from_context
from tandem.kv.transfer.chunks import ChunkSpec, plan_chunks
from tandem.kv.transfer.leases import CANCELLED, RELEASED, Lease, LeaseTable
from tandem.kv.transfer.metrics import ExportMetrics
from tandem.kv.transfer.protocol import ChunkExporter, PrefillEngine
from tandem.kv.transfer.settings import MAX_CHUNK_BYTES
from tandem.kv.transfer.shared_pool import SharedPoolInfo
from tandem.kv.transfer.wire import layout_to_proto, shared_pool_to_proto
from tandem.proto.common.v1 import common_pb2
from tandem.proto.kv.v1 import kv_pb2
from tandem.wire import logprob_to_proto, sampling_from_proto

log = structlog.get_logger("prefill")

SERVICE_NAME = kv_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
_FINISH = {FinishReason.STOP: common_pb2.FINISH_REASON_STOP, FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH}
_TRANSPORT_NAMES: dict[int, str] = {kv_pb2.KV_TRANSPORT_GRPC: "grpc", kv_pb2.KV_TRANSPORT_SHM: "shm"}


class PrefillServicer:
    """Handlers of ``tandem.kv.v1.PrefillService``; ``add_to_server`` registers them.

    ``exporters`` maps the transports this worker serves (by ``KvTransport`` number) to their
    exporters. Each lease's blocks are released exactly once, through ``free_lease``. When the
    engine's pool is in shared memory (``shared_pool``), handles name it and their block ids, so a
    decode worker on this host copies the blocks without PullKv.
    """

    def __init__(self, engine: PrefillEngine, exporters: Mapping[int, ChunkExporter], metrics: ExportMetrics, *,
                 lease_s: float, address: str, host_id: str) -> None:
        self._engine = engine
        self.exporters = dict(exporters)  # by KvTransport number
        self._metrics = metrics
        self.leases = LeaseTable(lease_s, self.free_lease)
        self._address = address
        self._host_id = host_id
        self._num_in_flight = 0
        self._draining = False
        self.shared_pool: SharedPoolInfo | None = None  # set by the worker once the engine has started
        self.pull_addresses: list[str] = []  # the exporter processes' addresses, once they serve
        # Test hook: awaited with the transfer id before a HoldKv answers (stalls an exporter's pull).
        self.before_hold: Callable[[str], Awaitable[None]] | None = None

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def _block_size(self) -> int:
        return self._engine.kv_layout().block_size  # known once the engine has started

    def start_draining(self) -> None:
        """Refuse new Prefill calls; pulls of existing leases go on."""
        self._draining = True

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the handlers. PullKv's messages are encoded by the exporters (payload copied once)."""
        handlers = {
            "Prefill": grpc.unary_unary_rpc_method_handler(
                self.Prefill, request_deserializer=kv_pb2.PrefillRequest.FromString,
                response_serializer=kv_pb2.PrefillResponse.SerializeToString),
            "PullKv": grpc.unary_stream_rpc_method_handler(
                self.PullKv, request_deserializer=kv_pb2.PullKvRequest.FromString,
                response_serializer=_already_encoded),
            "ReleaseKv": grpc.unary_unary_rpc_method_handler(
                self.ReleaseKv, request_deserializer=kv_pb2.ReleaseKvRequest.FromString,
                response_serializer=kv_pb2.ReleaseKvResponse.SerializeToString),
            "HoldKv": grpc.stream_stream_rpc_method_handler(
                self.HoldKv, request_deserializer=kv_pb2.HoldKvRequest.FromString,
                response_serializer=kv_pb2.HoldKvResponse.SerializeToString),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def free_lease(self, lease: Lease, reason: str) -> None:
        """The LeaseTable's callback: unpin the blocks, drop transport resources, count it."""
        await self._engine.release_kv(lease.transfer_id)
        for exporter in self.exporters.values():
            exporter.release(lease.transfer_id)
        self._metrics.leases_ended.labels(reason=reason).inc()
        self._observe_leases()
        log.debug("KV lease ended", transfer_id=lease.transfer_id, request_id=lease.request_id, reason=reason)

    def _observe_leases(self) -> None:
        self._metrics.leases_active.set(len(self.leases))
        self._metrics.leased_blocks.set(self.leases.num_blocks)

    async def Prefill(  # noqa: N802 (gRPC method name)
        self, request: kv_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.PrefillResponse:
        request_id = request_id_from_context(context) or request.request_id or f"prefill-{uuid.uuid4().hex}"
        bind_request_id(request_id)
        if self._draining:
            self._metrics.requests.labels(outcome="rejected").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill worker is draining; prefill elsewhere")
        transfer_id = f"{request.request_id or request_id}-{uuid.uuid4().hex[:8]}"  # unique per pin
        outcome = "cancelled"
        self._num_in_flight += 1
        self._metrics.queue_depth.set(self._num_in_flight)
        try:
            try:
                engine_request = EngineRequest(transfer_id, list(request.prompt_token_ids),
                                               sampling_from_proto(request.sampling),
                                               request.num_resumed_output_tokens)
                result = await self._engine.prefill(engine_request)
            except TandemError as error:
                outcome = "rejected"
                code = {InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
                        ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED}.get(type(error),
                                                                                  grpc.StatusCode.UNAVAILABLE)
                await context.abort(code, error.message)
            except Exception as error:
                outcome = "error"
                log.exception("prefill failed")
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill failed: {error}")
            response = kv_pb2.PrefillResponse(first_token_id=result.first_token_id,
                                              num_prompt_tokens=result.num_prompt_tokens,
                                              num_cached_tokens=result.num_cached_tokens)
            if result.first_token_logprob is not None:
                response.first_token_logprob.CopyFrom(logprob_to_proto(result.first_token_logprob))
            if result.finish_reason is not None:  # nothing pinned: the request ends with its first token
                outcome = "finished"
                response.finish_reason = _FINISH.get(result.finish_reason, common_pb2.FINISH_REASON_STOP)
                return response
            num_blocks = -(-result.num_prompt_tokens // self._block_size)
            self.leases.add(transfer_id, request_id, result.block_ids, result.num_prompt_tokens)
            self._observe_leases()
            # A caller that gave up before the answer arrived will never pull or release: free now.
            context.add_done_callback(lambda ctx: self._on_prefill_done(ctx, transfer_id))
            response.handle.CopyFrom(kv_pb2.KvHandle(
                transfer_id=transfer_id, address=self._address, layout=layout_to_proto(self._engine.kv_layout()),
                num_blocks=num_blocks, num_tokens=result.num_prompt_tokens,
                lease_ms=int(self.leases.lease_s * 1000), host_id=self._host_id))
            response.handle.pull_addresses.extend(self.pull_addresses)
            if self.shared_pool is not None and kv_pb2.KV_TRANSPORT_SHM in self.exporters:
                response.handle.shared_pool.CopyFrom(shared_pool_to_proto(self.shared_pool))
                response.handle.block_ids.extend(result.block_ids[:num_blocks])
            outcome = "ok"
            log.info("prefilled", transfer_id=transfer_id, num_prompt_tokens=result.num_prompt_tokens,
                     num_cached_tokens=result.num_cached_tokens, num_blocks=num_blocks)
            return response
        finally:
            self._num_in_flight -= 1
            self._metrics.queue_depth.set(self._num_in_flight)
            self._metrics.requests.labels(outcome=outcome).inc()

    def _on_prefill_done(self, context: grpc.aio.ServicerContext, transfer_id: str) -> None:
        if context.cancelled() and transfer_id in self.leases:
            log.info("prefill cancelled by the caller; freeing its blocks", transfer_id=transfer_id)
            asyncio.get_running_loop().create_task(self.leases.release(transfer_id, CANCELLED))

    async def PullKv(  # noqa: N802
        self, request: kv_pb2.PullKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        lease = self.leases.get(request.transfer_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {request.transfer_id!r} is not leased "
                                "here (released, or its lease expired)")
            return  # abort raises; this tells the type checker
        bind_request_id(lease.request_id)
        exporter = self.exporters.get(request.transport)
        if exporter is None:
            served = ", ".join(_TRANSPORT_NAMES[t] for t in self.exporters)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"transport: this prefill worker serves {served}")
            return
        num_blocks = -(-lease.num_tokens // self._block_size)
        try:
            plan = requested_plan(self._engine.kv_layout(), num_blocks, request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        transport = _TRANSPORT_NAMES[request.transport]
        with self.leases.pulling(lease):
            messages = exporter.chunks(lease.transfer_id, self._engine, lease.block_ids[:num_blocks], plan,
                                       skip_checksum=request.skip_checksum)
            try:
                async for message in messages:
                    yield message
            finally:
                # Now, not when garbage-collected: copies still running must end while the lease is busy.
                await messages.aclose()  # type: ignore[attr-defined,union-attr]
            self._metrics.bytes_sent.labels(transport=transport).inc(sum(c.num_bytes for c in plan))
            self._metrics.chunks_sent.labels(transport=transport).inc(len(plan))

    async def HoldKv(  # noqa: N802
        self, requests: AsyncIterator[kv_pb2.HoldKvRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.HoldKvResponse]:
        """An exporter process serves a pull of a lease here: its blocks, and the lease kept busy."""
        first = await anext(aiter(requests), None)
        if first is None:
            return
        lease = self.leases.get(first.transfer_id)
        if lease is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {first.transfer_id!r} is not leased "
                                "here (released, or its lease expired)")
            return
        num_blocks = -(-lease.num_tokens // self._block_size)
        last = first
        with self.leases.pulling(lease):
            if self.before_hold is not None:
                await self.before_hold(lease.transfer_id)
            yield kv_pb2.HoldKvResponse(block_ids=lease.block_ids[:num_blocks], num_tokens=lease.num_tokens,
                                        layout=layout_to_proto(self._engine.kv_layout()))
            async for request in requests:  # until the exporter closes its side (or goes away)
                last = request
        self._metrics.bytes_sent.labels(transport="grpc").inc(last.bytes_sent)
        self._metrics.chunks_sent.labels(transport="grpc").inc(last.chunks_sent)

    async def ReleaseKv(  # noqa: N802
        self, request: kv_pb2.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> kv_pb2.ReleaseKvResponse:
        return kv_pb2.ReleaseKvResponse(released=await self.leases.release(request.transfer_id, RELEASED))


def requested_plan(layout: KVLayout, num_blocks: int, request: kv_pb2.PullKvRequest) -> list[ChunkSpec]:
    """The chunks a PullKv call asks for, of a lease of ``num_blocks``; ValueError naming the bad field."""
    if not 0 < request.max_chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"max_chunk_bytes: must be in (0, {MAX_CHUNK_BYTES}], got {request.max_chunk_bytes}")
    plan = plan_chunks(layout, num_blocks, request.first_block, request.max_chunk_bytes)  # ChunkPlanError
    if request.sequence_numbers:
        wanted = set(request.sequence_numbers)
        if max(wanted) >= len(plan):
            raise ValueError(f"sequence_numbers: the plan has {len(plan)} chunks")
        plan = [chunk for chunk in plan if chunk.sequence_number in wanted]
    return plan


def _already_encoded(message: bytes) -> bytes:
    return message
