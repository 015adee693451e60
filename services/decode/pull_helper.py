"""A decode worker's pull helper process (``python -m services.decode.pull_helper``).

The worker starts ``--kv-pull-processes`` of these when its KV pool is in shared memory, and a
gRPC pull then runs one PullKv stream in each: the helper receives its share of the chunks,
verifies each (plan slice, CRC-32C) and writes it straight into the worker's pool, mapped
writable, at the reserved blocks the job names. It reports every chunk as written or rejected;
the worker keeps the plan, the retries and the deadline (``GrpcKvPuller``). The worker never frees
a reservation while a helper's stream is open: on cancellation it asks the helper to stop and
waits for the stream to end, which the helper does only once no write is under way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import structlog

from tandem.engine.types import KVLayout
from tandem.grpc_server import SERVER_OPTIONS
from tandem.kv.transfer.children import (
    HELPER_TOKEN_HEADER,
    HelperServer,
    helper_args,
    run_helper,
    token_matches,
)
from tandem.kv.transfer.chunks import ChunkPlanError, ChunkSpec, plan_chunks, tensor_from_bytes
from tandem.kv.transfer.pull import PULL_METHOD, ChannelPool, payload_problem, slice_problem
from tandem.kv.transfer.shared_pool import MappedPool, SharedPoolInfo
from tandem.kv.transfer.wire import decode_chunk, layout_from_proto
from tandem.proto.kv.v1 import kv_pb2

log = structlog.get_logger("decode.pull_helper")

SERVICE_NAME = kv_pb2.DESCRIPTOR.services_by_name["KvPullHelper"].full_name


def pull_helper_args(shm_dir: str, pool: SharedPoolInfo, layout: KVLayout, threads: int = 2) -> list[str]:
    """The command line the worker gives each helper."""
    return helper_args(pool, layout, shm_dir=shm_dir, threads=threads)


class PullHelperServicer:
    """``tandem.kv.v1.KvPullHelper``: PullKv streams landed in the worker's mapped pool."""

    def __init__(self, pool: MappedPool, threads: int) -> None:
        self._pool = pool
        self._channels = ChannelPool(1)
        self._threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kv-land")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {"PullInto": grpc.stream_stream_rpc_method_handler(
            self.PullInto, request_deserializer=kv_pb2.PullIntoRequest.FromString,
            response_serializer=kv_pb2.PullIntoResponse.SerializeToString)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))

    async def PullInto(  # noqa: N802 (gRPC method name)
        self, requests: AsyncIterator[kv_pb2.PullIntoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_pb2.PullIntoResponse]:
        if not token_matches(context):  # it listens on loopback: only its own worker may write into the pool
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{HELPER_TOKEN_HEADER}: not this helper's worker")
        job = await anext(aiter(requests), None)
        if job is None:
            return
        pool = self._pool
        if layout_from_proto(job.layout) != pool.kv_layout():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layout: {layout_from_proto(job.layout)} is not "
                                f"the pool's {pool.kv_layout()}")
        try:
            plan = plan_chunks(pool.kv_layout(), job.num_blocks, job.first_block, job.max_chunk_bytes)
        except ChunkPlanError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"job: {error}")
            return
        if len(job.target_block_ids) != job.num_blocks - job.first_block:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"target_block_ids: {len(job.target_block_ids)} "
                                f"ids for {job.num_blocks - job.first_block} blocks")
        by_seq = {chunk.sequence_number: chunk for chunk in plan}
        wanted = set(job.sequence_numbers)
        if not wanted <= by_seq.keys():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sequence_numbers: the plan has {len(plan)} chunks")
        stop = asyncio.Event()

        async def watch_stop() -> None:
            async for request in requests:
                if request.stop:
                    break
            stop.set()  # asked to stop, or the worker closed its side

        watcher = asyncio.create_task(watch_stop())
        stopping = asyncio.create_task(stop.wait())
        channel = self._channels.get(job.address)[0]
        call = channel.unary_stream(PULL_METHOD, request_serializer=kv_pb2.PullKvRequest.SerializeToString,
                                    response_deserializer=decode_chunk)(
            kv_pb2.PullKvRequest(transfer_id=job.transfer_id, first_block=job.first_block,
                                 max_chunk_bytes=job.max_chunk_bytes, sequence_numbers=sorted(wanted),
                                 transport=kv_pb2.KV_TRANSPORT_GRPC),
            timeout=max(0.001, job.timeout_s))
        loop = asyncio.get_running_loop()
        landing: deque[tuple[int, asyncio.Future[str | None]]] = deque()
        targets = list(job.target_block_ids)
        failure: grpc.aio.AioRpcError | None = None
        try:
            try:
                while True:
                    read = asyncio.ensure_future(call.read())
                    await asyncio.wait((read, stopping), return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():  # asked to stop while waiting for a chunk
                        read.cancel()
                        break
                    message = read.result()
                    if message is grpc.aio.EOF:
                        break
                    header, data = message
                    chunk = by_seq.get(header.sequence_number)
                    if chunk is None or header.sequence_number not in wanted:
                        continue
                    landing.append((chunk.sequence_number, loop.run_in_executor(
                        self._executor, self._land, pool, job, targets, chunk, header, data)))
                    while landing and (landing[0][1].done() or len(landing) > self._threads):
                        yield await self._result(*landing.popleft())
            except grpc.aio.AioRpcError as error:
                failure = error
            while landing:
                yield await self._result(*landing.popleft())
        finally:
            call.cancel()
            watcher.cancel()
            stopping.cancel()
            if landing:  # cancelled: the writes under way end before the stream does
                await asyncio.wait([future for _, future in landing])
        if failure is not None:
            await context.abort(failure.code(), failure.details() or "PullKv failed")

    @staticmethod
    async def _result(sequence_number: int, future: asyncio.Future[str | None]) -> kv_pb2.PullIntoResponse:
        try:
            problem = await future
        except Exception as error:  # noqa: BLE001 (reported, and the chunk asked for again)
            problem = f"{type(error).__name__}: {error}"
        return kv_pb2.PullIntoResponse(sequence_number=sequence_number, problem=problem or "")

    @staticmethod
    def _land(pool: MappedPool, job: kv_pb2.PullIntoRequest, targets: list[int], chunk: ChunkSpec,
              header: kv_pb2.KvChunk, data: memoryview) -> str | None:
        """On a thread: verify the chunk and write it into the reserved blocks; the problem, if any."""
        problem = slice_problem(header, chunk) or payload_problem(chunk, data, header.crc32c)
        if problem is not None:
            return problem
        start = chunk.block_start - job.first_block
        pool.write_blocks(targets[start : start + chunk.num_blocks], chunk.layer_start,
                          tensor_from_bytes(data, pool.kv_layout(), chunk))
        return None

    async def close(self) -> None:
        await self._channels.close()
        self._executor.shutdown(wait=True)


def _serve(pool: MappedPool, spec: dict[str, Any]) -> HelperServer:
    servicer = PullHelperServicer(pool, int(spec["threads"]))
    server = grpc.aio.server(options=SERVER_OPTIONS)
    servicer.add_to_server(server)
    return server, servicer.close


if __name__ == "__main__":
    run_helper("services.decode.pull_helper", _serve, writable=True)
