"""A prefill worker's exporter process (``python -m services.prefill.exporter``): serves PullKv.

The worker starts ``--kv-export-processes`` of these when its KV pool is in shared memory and
lists their addresses in every handle (``KvHandle.pull_addresses``), so decode workers pull a
transfer from several processes at once. Each maps the pool read-only. For each PullKv call it
opens ``HoldKv`` on its worker: the worker answers the lease's blocks and keeps the lease from
expiring until the exporter closes the hold, after the last chunk went out. It serves the gRPC
transport only (shared memory needs no exporter).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog

from services.prefill.servicer import requested_plan
from tandem.engine.types import KVLayout
from tandem.grpc_server import CHANNEL_OPTIONS, SERVER_OPTIONS
from tandem.kv.transfer.children import HelperServer, helper_args, run_helper
from tandem.kv.transfer.export import GrpcChunkExporter
from tandem.kv.transfer.shared_pool import MappedPool, SharedPoolInfo
from tandem.kv.transfer.wire import layout_from_proto
from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc

log = structlog.get_logger("prefill.exporter")

SERVICE_NAME = kv_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


def exporter_args(worker_address: str, host: str, shm_dir: str, pool: SharedPoolInfo, layout: KVLayout,
                  threads: int = 2) -> list[str]:
    """The command line the worker gives each exporter."""
    return helper_args(pool, layout, worker=worker_address, host=host, shm_dir=shm_dir, threads=threads)


class ExporterServicer:
    """PullKv over the mapped pool, each call under a HoldKv on the worker."""

    def __init__(self, pool: MappedPool, worker: kv_pb2_grpc.PrefillServiceStub, threads: int) -> None:
        self._pool = pool
        self._worker = worker
        self._exporter = GrpcChunkExporter(threads)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {"PullKv": grpc.unary_stream_rpc_method_handler(
            self.PullKv, request_deserializer=kv_pb2.PullKvRequest.FromString, response_serializer=bytes)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def PullKv(  # noqa: N802 (gRPC method name)
        self, request: kv_pb2.PullKvRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if request.transport != kv_pb2.KV_TRANSPORT_GRPC:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transport: an exporter process serves gRPC only")
        hold = self._worker.HoldKv(timeout=context.time_remaining())
        bytes_sent = chunks_sent = 0
        try:
            await hold.write(kv_pb2.HoldKvRequest(transfer_id=request.transfer_id))
            held = await hold.read()
            if held is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the prefill worker ended the hold")
            assert isinstance(held, kv_pb2.HoldKvResponse)
            pool = self._pool
            if layout_from_proto(held.layout) != pool.kv_layout():
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the worker's pool layout changed")
            try:
                plan = requested_plan(pool.kv_layout(), len(held.block_ids), request)
            except ValueError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            messages = self._exporter.chunks(request.transfer_id, pool, list(held.block_ids), plan,
                                             skip_checksum=request.skip_checksum)
            try:
                for chunk in plan:
                    message = await anext(messages)  # type: ignore[arg-type]
                    yield message
                    bytes_sent += chunk.num_bytes
                    chunks_sent += 1
            finally:
                await messages.aclose()  # type: ignore[attr-defined]  # copies end before the hold does
            await hold.write(kv_pb2.HoldKvRequest(bytes_sent=bytes_sent, chunks_sent=chunks_sent))
            await hold.done_writing()
            await hold.read()  # the worker ends the hold: the lease may expire again
        except grpc.aio.AioRpcError as error:
            # NOT_FOUND (not leased there) and the rest pass through as the worker said them.
            await context.abort(error.code(), error.details() or "HoldKv failed")
        finally:
            hold.cancel()  # a no-op when it ended

    def close(self) -> None:
        self._exporter.close()


def _serve(pool: MappedPool, spec: dict[str, Any]) -> HelperServer:
    channel = grpc.aio.insecure_channel(str(spec["worker"]), options=CHANNEL_OPTIONS)
    servicer = ExporterServicer(pool, kv_pb2_grpc.PrefillServiceStub(channel), int(spec["threads"]))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer.add_to_server(server)

    async def close() -> None:
        servicer.close()
        await channel.close()

    return server, close


if __name__ == "__main__":
    run_helper("services.prefill.exporter", _serve, writable=False)
