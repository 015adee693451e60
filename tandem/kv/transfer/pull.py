"""The decode worker's half of each transport: PullKv streams -> verified chunks -> the engine's pool.

gRPC and shared memory share everything but where a chunk's bytes are: inside the message, or
in a segment the message points to. Chunks are spread over several streams on separate
connections; a chunk that fails verification or never arrives is asked for again, a bounded
number of times, before the transfer's deadline.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.kv.transfer.children import HELPER_TOKEN_HEADER
from tandem.kv.transfer.chunks import (
    ChunkSpec,
    checksum,
    plan_chunks,
    tensor_from_bytes,
)
from tandem.kv.transfer.protocol import KvSink, KvTransferError, PullResult, TransferHandle
from tandem.kv.transfer.settings import PullSettings
from tandem.kv.transfer.wire import decode_chunk, layout_to_proto
from tandem.proto.kv.v1 import kv_pb2

log = structlog.get_logger("kv.transfer")

PULL_METHOD = "/tandem.kv.v1.PrefillService/PullKv"
# Separate TCP connections per stream (a shared subchannel would serialise them), large frames.
TRANSFER_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1),
                            ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1)]
# Codes after which asking again cannot help.
_FATAL = {grpc.StatusCode.NOT_FOUND: "not_found", grpc.StatusCode.INVALID_ARGUMENT: "invalid",
          grpc.StatusCode.FAILED_PRECONDITION: "invalid", grpc.StatusCode.UNIMPLEMENTED: "invalid"}

# Test hook: sees (header, payload) of every received chunk before verification and returns the
# payload to verify (corruption tests) or stalls (fault timing). Never set in production.
ChunkHook = Callable[[kv_pb2.KvChunk, memoryview], Awaitable[memoryview]]


class ChannelPool:
    """``size`` channels per prefill worker address, opened on first use and reused for every transfer."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._channels: dict[str, list[grpc.aio.Channel]] = {}

    def get(self, address: str) -> list[grpc.aio.Channel]:
        channels = self._channels.get(address)
        if channels is None:
            channels = [grpc.aio.insecure_channel(address, options=TRANSFER_CHANNEL_OPTIONS) for _ in range(self.size)]
            self._channels[address] = channels
        return channels

    async def close(self) -> None:
        for channels in self._channels.values():
            for channel in channels:
                await channel.close()
        self._channels.clear()


class _StreamingPuller(abc.ABC):
    """Plan, spread over streams, verify, write, retry. Subclasses say where a chunk's bytes are."""

    name = ""
    transport: int = kv_pb2.KV_TRANSPORT_UNSPECIFIED

    def __init__(self, settings: PullSettings, channels: ChannelPool, *, chunk_hook: ChunkHook | None = None) -> None:
        self.settings = settings
        self._channels = channels
        self.chunk_hook = chunk_hook
        # Checksums and copies into the pool release the GIL: a few threads land chunks while the
        # event loop keeps receiving.
        self._executor = ThreadPoolExecutor(settings.num_copy_threads, thread_name_prefix="kv-pull")

    @property
    def _skip_checksum(self) -> bool:
        return False

    @abc.abstractmethod
    def _payload(self, header: kv_pb2.KvChunk, data: memoryview) -> memoryview:
        """The chunk's bytes: inline in the message (gRPC) or in a shared-memory segment."""

    async def pull(self, handle: TransferHandle, first_block: int, sink: KvSink, *, timeout_s: float) -> PullResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + timeout_s
        result = PullResult(self.name)
        plan = plan_chunks(handle.layout, handle.num_blocks, first_block, self.settings.max_chunk_bytes)
        by_seq = {chunk.sequence_number: chunk for chunk in plan}
        remaining = set(by_seq)
        attempt = 0
        while remaining:
            if attempt > 0:
                if attempt > self.settings.max_retries:
                    reason = "corrupt" if result.retry_reasons else "unavailable"
                    raise KvTransferError(f"{len(remaining)} of {len(plan)} chunks still missing after "
                                          f"{self.settings.max_retries} retries", reason)
                result.num_retried_chunks += len(remaining)
                await asyncio.sleep(min(self.settings.retry_backoff_s * attempt, max(0.0, deadline - loop.time())))
            if loop.time() >= deadline:
                raise KvTransferError(f"transfer deadline of {timeout_s:.1f} s passed with {len(remaining)} "
                                      "chunks missing", "deadline")
            wanted = sorted(remaining)
            outcomes = await asyncio.gather(*self._streams(handle, first_block, wanted, by_seq, remaining, sink,
                                                           result, deadline - loop.time(), attempt),
                                            return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    self._judge(outcome, result)
            attempt += 1
        result.duration_s = time.perf_counter() - started
        return result

    def _streams(self, handle: TransferHandle, first_block: int, wanted: list[int], by_seq: dict[int, ChunkSpec],
                 remaining: set[int], sink: KvSink, result: PullResult, timeout_s: float, attempt: int
                 ) -> list[Coroutine[None, None, None]]:
        """One attempt's streams: ``wanted`` dealt out over them, and they over the handle's addresses
        (the prefill worker's exporter processes when it has them)."""
        num_streams = min(self.settings.num_streams, len(wanted))
        addresses = self._addresses(handle, attempt)
        channels = [channel for address in addresses for channel in self._channels.get(address)]
        # Stream i on connection i of address i: streams spread over processes first.
        order = [channels[(i % len(addresses)) * self._channels.size + (i // len(addresses)) % self._channels.size]
                 for i in range(num_streams)]
        return [self._stream(order[i], handle, first_block, wanted[i::num_streams], by_seq, remaining, sink, result,
                             timeout_s) for i in range(num_streams)]

    def _addresses(self, handle: TransferHandle, attempt: int) -> list[str]:
        return [handle.address]

    def _judge(self, error: BaseException, result: PullResult) -> None:
        """Raise for failures no retry can fix; note the others and let the loop ask again."""
        if isinstance(error, asyncio.CancelledError):
            raise error
        if isinstance(error, grpc.aio.AioRpcError):
            code = error.code()
            if code in _FATAL:
                raise KvTransferError(f"PullKv failed: {code.name}: {error.details()}", _FATAL[code])
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise KvTransferError("the transfer deadline passed", "deadline")
            result.retry_reasons.append(code.name.lower())
            log.warning("KV stream broke; asking again", code=code.name, details=error.details())
            return
        if isinstance(error, KvTransferError):
            raise error
        if isinstance(error, Exception):
            result.retry_reasons.append(type(error).__name__)
            log.warning("KV stream failed; asking again", error=repr(error))
            return
        raise error

    async def _stream(self, channel: grpc.aio.Channel, handle: TransferHandle, first_block: int,
                      sequence_numbers: Sequence[int], by_seq: dict[int, ChunkSpec], remaining: set[int],
                      sink: KvSink, result: PullResult, timeout_s: float) -> None:
        call_factory = channel.unary_stream(PULL_METHOD, request_serializer=kv_pb2.PullKvRequest.SerializeToString,
                                            response_deserializer=decode_chunk)
        request = kv_pb2.PullKvRequest(
            transfer_id=handle.transfer_id, first_block=first_block, max_chunk_bytes=self.settings.max_chunk_bytes,
            sequence_numbers=sequence_numbers, transport=self.transport,  # type: ignore[arg-type]
            skip_checksum=self._skip_checksum)
        call = call_factory(request, timeout=max(0.001, timeout_s))
        loop = asyncio.get_running_loop()
        landing: set[asyncio.Future[str | None]] = set()
        try:
            async for header, data in call:
                chunk = by_seq.get(header.sequence_number)
                if chunk is None or header.sequence_number not in remaining:
                    continue  # not asked for, or already have it: ignore rather than fail
                problem = slice_problem(header, chunk)
                payload = None
                if problem is None:
                    try:
                        payload = self._payload(header, data)
                    except (OSError, ValueError) as error:
                        raise KvTransferError(f"cannot read chunk {chunk.sequence_number}: {error}", "shm") from error
                    if self.chunk_hook is not None:
                        payload = await self.chunk_hook(header, payload)
                if problem is not None or payload is None:
                    self._note_corrupt(handle, chunk, problem, result)
                    continue
                if len(landing) >= self.settings.num_copy_threads + 1:  # bound the chunks held in memory
                    await asyncio.wait(landing, return_when=asyncio.FIRST_COMPLETED)
                future = loop.run_in_executor(self._executor, self._land, handle, chunk, header.crc32c, payload,
                                              sink)
                landing.add(future)
                future.add_done_callback(landing.discard)
                future.add_done_callback(functools.partial(self._landed, handle=handle, chunk=chunk,
                                                           remaining=remaining, result=result))
        finally:
            call.cancel()  # a no-op when it finished; frees the server side otherwise
            # Never return (or raise) while a copy into the reservation is still running: the caller
            # may free the reserved blocks next.
            if landing:
                await asyncio.wait(landing)

    def _land(self, handle: TransferHandle, chunk: ChunkSpec, expected_checksum: int, payload: memoryview,
              sink: KvSink) -> str | None:
        """On a worker thread: verify the bytes and copy them into the sink; the problem, if any."""
        problem = payload_problem(chunk, payload, None if self._skip_checksum else expected_checksum)
        if problem is not None:
            return problem
        sink.write(chunk.block_start, chunk.layer_start, tensor_from_bytes(payload, handle.layout, chunk))
        return None

    def _landed(self, future: asyncio.Future[str | None], handle: TransferHandle, chunk: ChunkSpec,
                remaining: set[int], result: PullResult) -> None:
        """Back on the event loop: count the chunk in, or leave it missing for the next attempt."""
        if future.cancelled():
            return
        error = future.exception()
        problem = f"{type(error).__name__}: {error}" if error is not None else future.result()
        if problem is not None:
            self._note_corrupt(handle, chunk, problem, result)
            return
        remaining.discard(chunk.sequence_number)
        result.num_bytes += chunk.num_bytes
        result.num_chunks += 1

    @staticmethod
    def _note_corrupt(handle: TransferHandle, chunk: ChunkSpec, problem: str | None, result: PullResult) -> None:
        result.retry_reasons.append("corrupt")
        log.warning("KV chunk failed verification; will ask again", transfer_id=handle.transfer_id,
                    sequence_number=chunk.sequence_number, problem=problem)



def slice_problem(header: kv_pb2.KvChunk, chunk: ChunkSpec) -> str | None:
    """The header must describe the slice the plan has under its sequence number."""
    got = (header.layer_start, header.num_layers, header.block_start, header.num_blocks)
    want = (chunk.layer_start, chunk.num_layers, chunk.block_start, chunk.num_blocks)
    return None if got == want else f"slice {got} != planned {want}"


def payload_problem(chunk: ChunkSpec, payload: memoryview, expected_checksum: int | None) -> str | None:
    """The chunk's bytes must have the planned size and (unless None) the sender's CRC-32C."""
    if len(payload) != chunk.num_bytes:
        return f"size {len(payload)} != {chunk.num_bytes}"
    if expected_checksum is not None and checksum(payload) != expected_checksum:
        return "checksum mismatch"
    return None


HELPER_METHOD = "/tandem.kv.v1.KvPullHelper/PullInto"
# Transfers of fewer chunks go to the prefill worker itself and land in this process: a hold on the
# worker and a helper's stream add round trips that only pay when there is work to share. On a
# 16-core host 4 exporters + 4 helpers moved 3 MB (1 chunk) at 0.28 GB/s against 0.46 in one
# process, 12 MB (4) at 0.80-0.97 against 1.04, 25 MB (8) at 0.91-1.35 against 0.89-1.17, and
# 94 MB (32) at 1.52-2.67 against 0.99-1.41.
MIN_CHUNKS_FOR_PROCESSES = 16
# How long a pull helper asked to stop may take to end its stream before it is killed.
_HELPER_STOP_S = 5.0


class PullHelpers:
    """The decode worker's pull helper processes (``services.decode.pull_helper``): their addresses,
    a channel to each, and how to stop one that does not end its stream when asked."""

    def __init__(self, addresses: Sequence[str], alive: Callable[[int], bool], kill: Callable[[int], None],
                 token: str) -> None:
        self.addresses = list(addresses)
        self.metadata = ((HELPER_TOKEN_HEADER, token),)  # proves the calls come from the helpers' worker
        self.alive = alive
        self.kill = kill
        self._channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in addresses]
        self._reported: set[int] = set()  # exited helpers already logged

    def live(self) -> list[int]:
        live = [index for index in range(len(self.addresses)) if self.alive(index)]
        for index in sorted(set(range(len(self.addresses))) - set(live) - self._reported):
            log.error("a KV pull helper process exited; pulling with the others", helper=index, helpers_left=len(live))
            self._reported.add(index)
        return live

    def channel(self, index: int) -> grpc.aio.Channel:
        return self._channels[index]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class GrpcKvPuller(_StreamingPuller):
    """Chunk bytes inside the PullKv messages: works across hosts and containers.

    Streams go to the prefill worker's exporter processes when the handle lists them. With pull
    helpers (``helpers``) and a sink in the pool they map, each stream runs in a helper process,
    which writes the chunks into the pool itself; this process keeps the plan and the retries.
    """

    name = "grpc"
    transport = kv_pb2.KV_TRANSPORT_GRPC

    def __init__(self, settings: PullSettings, channels: ChannelPool, *, chunk_hook: ChunkHook | None = None,
                 helpers: PullHelpers | None = None) -> None:
        super().__init__(settings, channels, chunk_hook=chunk_hook)
        self.helpers = helpers

    def _payload(self, header: kv_pb2.KvChunk, data: memoryview) -> memoryview:
        return data

    def _addresses(self, handle: TransferHandle, attempt: int) -> list[str]:
        """The exporter processes first; retries go to the prefill worker itself (an exporter may be gone)."""
        return (list(handle.pull_addresses) if attempt == 0 else []) or [handle.address]

    def _streams(self, handle: TransferHandle, first_block: int, wanted: list[int], by_seq: dict[int, ChunkSpec],
                 remaining: set[int], sink: KvSink, result: PullResult, timeout_s: float, attempt: int
                 ) -> list[Coroutine[None, None, None]]:
        if len(by_seq) < MIN_CHUNKS_FOR_PROCESSES:  # small: the extra hops cost more than they share
            handle = dataclasses.replace(handle, pull_addresses=())
            return super()._streams(handle, first_block, wanted, by_seq, remaining, sink, result, timeout_s,
                                    attempt)
        # (The test hook sees chunks in this process only: with it set, no helpers.)
        live = self.helpers.live() if self.helpers is not None and self.chunk_hook is None else []
        target_ids = getattr(sink, "target_block_ids", None)
        targets = target_ids(first_block, handle.num_blocks - first_block) if live and target_ids else None
        if not live or targets is None:
            return super()._streams(handle, first_block, wanted, by_seq, remaining, sink, result, timeout_s,
                                    attempt)
        num_streams = min(len(live), len(wanted))
        addresses = self._addresses(handle, attempt)
        return [self._helper_stream(live[i], addresses[i % len(addresses)], handle, first_block,
                                    wanted[i::num_streams], by_seq, remaining, list(targets), result, timeout_s)
                for i in range(num_streams)]

    async def _helper_stream(self, index: int, address: str, handle: TransferHandle, first_block: int,
                             sequence_numbers: Sequence[int], by_seq: dict[int, ChunkSpec], remaining: set[int],
                             targets: list[int], result: PullResult, timeout_s: float) -> None:
        """One stream run by helper ``index``: count in the chunks it reports written."""
        assert self.helpers is not None
        call = self.helpers.channel(index).stream_stream(
            HELPER_METHOD, request_serializer=kv_pb2.PullIntoRequest.SerializeToString,
            response_deserializer=kv_pb2.PullIntoResponse.FromString)(metadata=self.helpers.metadata)
        ended = False  # the helper's handler has returned: it writes nothing more
        try:
            await call.write(kv_pb2.PullIntoRequest(
                transfer_id=handle.transfer_id, address=address, layout=layout_to_proto(handle.layout),
                num_blocks=handle.num_blocks, first_block=first_block, max_chunk_bytes=self.settings.max_chunk_bytes,
                sequence_numbers=sequence_numbers, target_block_ids=targets, timeout_s=timeout_s))
            try:
                async with asyncio.timeout(timeout_s + _HELPER_STOP_S):
                    async for reply in call:  # type: ignore[attr-defined]
                        chunk = by_seq.get(reply.sequence_number)
                        if chunk is None or reply.sequence_number not in remaining:
                            continue
                        if reply.problem:
                            self._note_corrupt(handle, chunk, reply.problem, result)
                            continue
                        remaining.discard(chunk.sequence_number)
                        result.num_bytes += chunk.num_bytes
                        result.num_chunks += 1
            except grpc.aio.AioRpcError:
                ended = True  # its status (PullKv's, or UNAVAILABLE when it died) is judged by pull()
                raise
            ended = True
        finally:
            if not ended:  # cancelled or timed out: the reservation must not be freed under its writes
                await asyncio.wait([asyncio.ensure_future(self._stop_helper(index, call))])

    async def _stop_helper(self, index: int, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        assert self.helpers is not None
        try:
            async with asyncio.timeout(_HELPER_STOP_S):
                await call.write(kv_pb2.PullIntoRequest(stop=True))
                await call.done_writing()
                async for _ in call:  # type: ignore[attr-defined]
                    pass
            return
        except grpc.aio.AioRpcError:
            return  # its handler ended (or the process is gone)
        except (TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass
        log.error("a KV pull helper did not stop when asked; killing it", helper=index)
        self.helpers.kill(index)

    async def close(self) -> None:
        await self._channels.close()
        if self.helpers is not None:
            await self.helpers.close()
        self._executor.shutdown(wait=True)
