"""KV transfer throughput: the real PrefillService in another process, pulled over gRPC and shared memory,
beside memcpy and a raw TCP socket measured in the same run.

Shapes: the default model (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, float32: 45 KiB a
token) and a 0.5B-class shape (Qwen2.5-0.5B: 24 layers, 2 KV heads, head_dim 64, bfloat16: 12 KiB
a token). gRPC and shm times include gathering the blocks from the prefill side's paged pool and
scattering them into the decode side's (as in a real transfer); memcpy and TCP move one contiguous
buffer. The prefill side's pool is in shared memory, as a prefill worker's on a CPU: "shm" copies
blocks pool to pool (no PullKv call); "shm staged+crc" goes through staging segments with CRC-32C
(the path of a GPU pool, or of --verify-shm-checksums). Every figure is the median of --runs timed
runs after one warm-up (four times as many under 32 MB), in GB/s (1e9 bytes). Each "prefill"
writes its blocks once, as a model does just before a transfer. memcpy is one contiguous copy of
as many bytes timed just before each shm pull, and shm/memcpy is the median of the per-run ratios:
pairing cancels the host's drift, which at 3-12 MB moved a lone memcpy figure by 2x between runs.
"grpc ceiling Np" is what Python gRPC itself moves on this host: N pairs of bare grpcio processes
streaming one in-cache message of the chunk size over and over, with no gathering, checksum or
landing; grpcio copies each message once on the sender and twice on the receiver (slices into
bytes objects, then joined), all holding the interpreter lock, so one process pair is the bound
for any transfer served and pulled by one process each. "grpc N+N proc" is PullKv served by N
exporter processes of the prefill side and pulled by N pull helper processes of the decode side
(--kv-export-processes / --kv-pull-processes), over both sides' pools in shared memory.
Usage: python benchmarks/kv_transfer.py [--tokens 256 2048 8192] [--runs 5] [--threads 1] [--processes 2 4]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # services/, when run from anywhere
from _stats import median, table  # noqa: E402

SHAPES = {
    "smollm2-135m fp32": (30, 3, 64, "float32"),
    "qwen2.5-0.5b bf16": (24, 2, 64, "bfloat16"),
}
BLOCK_SIZE = 16


def _layout(shape: str):  # type: ignore[no-untyped-def]
    from tandem.engine.types import KVLayout

    layers, heads, dim, dtype = SHAPES[shape]
    return KVLayout(layers, heads, dim, BLOCK_SIZE, dtype)


# -- the prefill side: a real PrefillServicer over a synthetic pool, in its own process ---------------

def _serve(shape: str, num_blocks: int, threads: int, shm_dir: str, ready: mp.Queue,  # type: ignore[type-arg]
           export_threads: int = 2, export_processes: int = 0) -> None:
    import torch

    torch.set_num_threads(threads)
    from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
    from tandem.telemetry.logging import configure_logging

    configure_logging("bench-prefill", level="WARNING")
    keep_large_buffers_in_heap()

    async def main() -> None:
        from prometheus_client import CollectorRegistry

        from services.prefill.servicer import SERVICE_NAME, PrefillServicer
        from tandem.grpc_server import GrpcService
        from tandem.kv.transfer.export import GrpcChunkExporter, ShmChunkExporter
        from tandem.kv.transfer.host import host_id
        from tandem.kv.transfer.metrics import ExportMetrics
        from tandem.kv.transfer.protocol import ChunkExporter
        from tandem.kv.transfer.synthetic import SyntheticPrefillEngine
        from tandem.proto.kv.v1 import kv_pb2

        # Each "prefill" writes its blocks once (as a model would, just before the transfer).
        engine = SyntheticPrefillEngine(_layout(shape), num_blocks, refill=False, touch=True, shm_dir=shm_dir)
        engine.fill(list(range(num_blocks)), seed=1)
        service = GrpcService("127.0.0.1", 0, [SERVICE_NAME])
        address = f"127.0.0.1:{service.port}"
        exporters: dict[int, ChunkExporter] = {kv_pb2.KV_TRANSPORT_GRPC: GrpcChunkExporter(export_threads),
                     kv_pb2.KV_TRANSPORT_SHM: ShmChunkExporter(shm_dir, 2 << 30, export_threads)}
        servicer = PrefillServicer(engine, exporters, ExportMetrics(CollectorRegistry()), lease_s=600,
                                   address=address, host_id=host_id(shm_dir))
        servicer.shared_pool = engine.shared.info if engine.shared is not None else None
        servicer.add_to_server(service.server)
        await service.start()
        helpers = None
        if export_processes and engine.shared is not None:
            from services.prefill.exporter import exporter_args
            from tandem.kv.transfer.children import HelperProcesses

            helpers = HelperProcesses("services.prefill.exporter", exporter_args(
                address, "127.0.0.1", shm_dir, engine.shared.info, engine.kv_layout(), export_threads), export_processes)
            servicer.pull_addresses = [f"127.0.0.1:{port}" for port in await helpers.start()]
        await service.set_serving(True)
        ready.put(address)
        try:
            await service.server.wait_for_termination()
        finally:
            if helpers is not None:
                await helpers.close()
            engine.close()

    asyncio.run(main())


# -- baselines ----------------------------------------------------------------------------------------

def _tcp_sender(port: int, num_bytes: int, runs: int) -> None:
    buf = bytearray(os.urandom(1 << 20)) * (num_bytes >> 20) + bytearray(num_bytes % (1 << 20))
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(runs + 1):
            conn.recv(1)
            conn.sendall(memoryview(buf))


def tcp_gbps(num_bytes: int, runs: int) -> float:
    """One loopback connection into a preallocated buffer (recv_into: the kernel's copies only)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        sender = mp.get_context("spawn").Process(target=_tcp_sender, args=(server.getsockname()[1], num_bytes, runs))
        sender.start()
        conn, _ = server.accept()
        dst = bytearray(num_bytes)
        view = memoryview(dst)
        times = []
        with conn:
            for run in range(runs + 1):
                started = time.perf_counter()
                conn.send(b"x")
                received = 0
                while received < num_bytes:
                    received += conn.recv_into(view[received:], min(num_bytes - received, 4 << 20))
                if run:  # the first run faults the pages in
                    times.append(time.perf_counter() - started)
        sender.join()
    return num_bytes / median(times) / 1e9


_RAW_SERVICE = "tandem.bench.RawStream"


def _raw_grpc_server(chunk_bytes: int, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    """A bare grpcio server that streams one prebuilt message (in cache) as many times as asked."""
    import grpc

    from tandem.grpc_server import SERVER_OPTIONS
    from tandem.kv.transfer.tuning import keep_large_buffers_in_heap

    keep_large_buffers_in_heap()
    payload = os.urandom(chunk_bytes)

    async def pull(request: str, context: object):  # type: ignore[no-untyped-def]
        for _ in range(int(request)):
            yield payload

    async def main() -> None:
        handler = grpc.method_handlers_generic_handler(_RAW_SERVICE, {"Pull": grpc.unary_stream_rpc_method_handler(
            pull, request_deserializer=bytes.decode)})
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _raw_grpc_client(port: int, num_chunks: int, runs: int, barrier, spans: mp.Queue) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Pull ``num_chunks`` messages per run, discarding them; report each run's (start, end)."""
    import grpc

    from tandem.kv.transfer.pull import TRANSFER_CHANNEL_OPTIONS
    from tandem.kv.transfer.tuning import keep_large_buffers_in_heap

    keep_large_buffers_in_heap()

    async def main() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=TRANSFER_CHANNEL_OPTIONS) as channel:
            call = channel.unary_stream(f"/{_RAW_SERVICE}/Pull", request_serializer=str.encode)
            for run in range(runs + 1):
                await asyncio.to_thread(barrier.wait)
                started = time.monotonic()  # system-wide: comparable across the client processes
                async for _ in call(str(num_chunks)):
                    pass
                if run:  # the first run opens the connection
                    spans.put((run, started, time.monotonic()))

    asyncio.run(main())


def grpc_ceiling_gbps(num_bytes: int, chunk_bytes: int, runs: int, processes: int) -> float:
    """The Python gRPC ceiling: bare grpcio streams of in-cache messages, ``processes`` server/client
    pairs each moving a share of ``num_bytes``; GB/s over the span from the first start to the last end."""
    context = mp.get_context("spawn")
    ready: mp.Queue = context.Queue()  # type: ignore[type-arg]
    spans: mp.Queue = context.Queue()  # type: ignore[type-arg]
    barrier = context.Barrier(processes)
    num_chunks = max(1, -(-num_bytes // (chunk_bytes * processes)))
    servers = [context.Process(target=_raw_grpc_server, args=(chunk_bytes, ready), daemon=True)
               for _ in range(processes)]
    for server in servers:
        server.start()
    clients = []
    try:
        ports = [ready.get(timeout=60) for _ in servers]
        clients = [context.Process(target=_raw_grpc_client, args=(port, num_chunks, runs, barrier, spans), daemon=True)
                   for port in ports]
        for client in clients:
            client.start()
        by_run: dict[int, list[tuple[float, float]]] = {}
        for _ in range(runs * processes):
            run, started, ended = spans.get(timeout=120)
            by_run.setdefault(run, []).append((started, ended))
        moved = num_chunks * chunk_bytes * processes
        return moved / median([max(e for _, e in s) - min(b for b, _ in s) for s in by_run.values()]) / 1e9
    finally:
        for process in [*clients, *servers]:
            process.kill()


# -- the transfer paths ------------------------------------------------------------------------------

async def _pull_gbps(address: str, shape: str, num_tokens: int, runs: int, make_puller: Callable[[], object],
                     protobuf_client: bool = False, scattered: bool = False, pull_processes: int = 0,
                     shm_dir: str = "") -> tuple[float, float, float]:
    """Median GB/s of the pulls, median GB/s of a memcpy of as many bytes timed just before each
    pull, and the median of the per-run (pull / memcpy) ratios. With ``pull_processes``, the
    decode side's pool is in shared memory and that many pull helper processes land the chunks."""
    import grpc

    from tandem.kv.transfer.synthetic import SyntheticKvPool
    from tandem.kv.transfer.wire import handle_from_proto
    from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc

    layout = _layout(shape)
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    sink_pool = SyntheticKvPool(layout, num_blocks, shm_dir=shm_dir if pull_processes else None)
    # A long-running decode pool hands out scattered blocks: reversed order is the worst case (no
    # two neighbours adjacent); in order, the best.
    block_ids = list(range(num_blocks))[::-1] if scattered else list(range(num_blocks))

    class Sink:
        def write(self, block_index: int, layer_start: int, data):  # type: ignore[no-untyped-def]
            sink_pool.write_blocks(block_ids[block_index : block_index + data.shape[2]], layer_start, data)

        def copy_from_pool(self, block_index, source_k, source_v, source_block_ids):  # type: ignore[no-untyped-def]
            sink_pool.copy_blocks_from(block_ids[block_index : block_index + len(source_block_ids)], source_k,
                                       source_v, source_block_ids)

        def target_block_ids(self, block_index: int, count: int):  # type: ignore[no-untyped-def]
            return block_ids[block_index : block_index + count] if pull_processes else None

    import torch

    puller = make_puller()
    helpers = None
    if pull_processes:
        from services.decode.pull_helper import pull_helper_args
        from tandem.kv.transfer.children import HelperProcesses
        from tandem.kv.transfer.pull import PullHelpers

        assert sink_pool.shared is not None
        helpers = HelperProcesses("services.decode.pull_helper", pull_helper_args(shm_dir, sink_pool.shared.info, layout),
                                  pull_processes)
        ports = await helpers.start()
        puller.helpers = PullHelpers([f"127.0.0.1:{p}" for p in ports], helpers.alive, helpers.kill, helpers.token)  # type: ignore[attr-defined]
    num_bytes = num_tokens * layout.bytes_per_block_layer * layout.num_layers // BLOCK_SIZE
    copy_src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    copy_dst = torch.empty_like(copy_src)
    times, copy_times = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = kv_pb2_grpc.PrefillServiceStub(channel)
        for run in range(runs + 1):
            sent_at = time.monotonic()
            reply = await stub.Prefill(kv_pb2.PrefillRequest(request_id=f"bench-{run}", prompt_token_ids=[1] * num_tokens))
            handle = handle_from_proto(reply.handle, address, sent_at + reply.handle.lease_ms / 1000)
            started = time.perf_counter()
            copy_dst.copy_(copy_src)
            copy_time = time.perf_counter() - started
            started = time.perf_counter()
            if protobuf_client:
                await _naive_pull(stub, handle, Sink())
            else:
                await puller.pull(handle, 0, Sink(), timeout_s=120)  # type: ignore[attr-defined]
            if run:
                times.append(time.perf_counter() - started)
                copy_times.append(copy_time)
            await stub.ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=handle.transfer_id))
    await puller.close()  # type: ignore[attr-defined]
    if helpers is not None:
        await helpers.close()
    sink_pool.close()
    return (num_bytes / median(times) / 1e9, num_bytes / median(copy_times) / 1e9,
            median([c / t for c, t in zip(copy_times, times, strict=True)]))


async def _naive_pull(stub, handle, sink) -> None:  # type: ignore[no-untyped-def]
    """The straightforward client, for comparison: one stream, protobuf parsing (a copy of each chunk)."""
    from tandem.kv.transfer.chunks import checksum, plan_chunks, tensor_from_bytes
    from tandem.proto.kv.v1 import kv_pb2

    plan = {c.sequence_number: c for c in plan_chunks(handle.layout, handle.num_blocks, 0, 2 << 20)}
    request = kv_pb2.PullKvRequest(transfer_id=handle.transfer_id, max_chunk_bytes=2 << 20,
                                   transport=kv_pb2.KV_TRANSPORT_GRPC)
    async for chunk in stub.PullKv(request, timeout=120):
        if checksum(chunk.data) != chunk.crc32c:
            raise RuntimeError("corrupt chunk")
        spec = plan[chunk.sequence_number]
        sink.write(spec.block_start, spec.layer_start, tensor_from_bytes(chunk.data, handle.layout, spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process (workers use 1 here)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4], help="parallel PullKv streams to try")
    parser.add_argument("--chunk-kib", type=int, default=3072, help="chunk bound of the gRPC path")
    parser.add_argument("--ceiling-processes", type=int, nargs="+", default=[1, 2],
                        help="bare-grpcio ceilings to measure: server/client process pairs (the first is the ratio's)")
    parser.add_argument("--processes", type=int, nargs="*", default=[2, 4],
                        help="gRPC served by N exporter processes and pulled by N pull helper processes")
    parser.add_argument("--shm-chunk-kib", type=int, default=3072, help="chunk bound of the shm path")
    parser.add_argument("--export-threads", type=int, default=2, help="prefill side: threads preparing chunks")
    parser.add_argument("--copy-threads", type=int, default=2, help="decode side: threads landing chunks")
    parser.add_argument("--shm-dir", default="/dev/shm")
    parser.add_argument("--scattered", action="store_true", help="decode side: blocks in reverse order, not in order")
    args = parser.parse_args()
    os.environ.setdefault("TANDEM_LOG_LEVEL", "WARNING")  # helper processes log at this level too

    import torch

    torch.set_num_threads(args.threads)
    from tandem.kv.transfer.tuning import keep_large_buffers_in_heap
    from tandem.telemetry.logging import configure_logging

    configure_logging("bench", level="WARNING")
    keep_large_buffers_in_heap()
    print(f"{os.cpu_count()} CPUs, torch threads {args.threads} per process, {args.runs} runs (median), "
          f"chunk bound {args.chunk_kib} KiB (shm {args.shm_chunk_kib} KiB), {args.export_threads} export and "
          f"{args.copy_threads} copy threads, decode blocks {'scattered' if args.scattered else 'in order'}",
          flush=True)
    rows: list[list[object]] = []
    # The prefill process is killed at the end: its segments and pool go in a folder removed here.
    shm_dir = tempfile.mkdtemp(prefix="tandem-kv-bench-", dir=args.shm_dir)
    try:
        for shape in args.shapes:
            rows.extend(_measure_shape(args, shape, shm_dir))
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    headers = ["shape", "tokens", "MB", "memcpy", "tcp", *(f"grpc ceiling {n}p" for n in args.ceiling_processes),
               "grpc naive", *(f"grpc x{s}" for s in args.streams), *(f"grpc {n}+{n} proc" for n in args.processes),
               "best grpc/tcp", f"best grpc/ceiling {args.ceiling_processes[0]}p", "shm",
               "shm staged+crc", "shm/memcpy"]
    print()
    print(table(headers, rows))


def _measure_shape(args: argparse.Namespace, shape: str, shm_dir: str) -> list[list[object]]:
    from tandem.kv.transfer.pull import ChannelPool, GrpcKvPuller
    from tandem.kv.transfer.settings import PullSettings
    from tandem.kv.transfer.shm import SegmentReader
    from tandem.kv.transfer.shm_pull import ShmKvPuller

    chunk = args.chunk_kib * 1024
    rows: list[list[object]] = []
    layout = _layout(shape)
    num_blocks = -(-max(args.tokens) // BLOCK_SIZE) + 8
    context = mp.get_context("spawn")
    ready: mp.Queue = context.Queue()  # type: ignore[type-arg]
    servers = [context.Process(target=_serve, args=(shape, num_blocks, args.threads, shm_dir, ready,
                                                    args.export_threads, n), daemon=True)
               for n in [0, *args.processes]]
    addresses = []
    for server in servers:  # one at a time: each answers on the shared queue
        server.start()
        addresses.append(ready.get(timeout=120))
    try:
        for num_tokens in args.tokens:
            num_bytes = num_tokens * layout.num_layers * layout.bytes_per_block_layer // BLOCK_SIZE
            runs = args.runs * 4 if num_bytes < 32e6 else args.runs  # small copies are noisier
            tcp = tcp_gbps(num_bytes, runs)
            ceilings = [grpc_ceiling_gbps(num_bytes, chunk, runs, n) for n in args.ceiling_processes]

            def grpc_puller(streams: int) -> Callable[[], object]:
                settings = PullSettings(max_chunk_bytes=chunk, num_streams=streams,
                                        num_copy_threads=args.copy_threads)
                return lambda: GrpcKvPuller(settings, ChannelPool(streams))

            def shm_puller(verify: bool) -> Callable[[], object]:
                settings = PullSettings(max_chunk_bytes=args.shm_chunk_kib * 1024, num_streams=1,
                                        verify_shm_checksums=verify, num_copy_threads=args.copy_threads)
                return lambda: ShmKvPuller(settings, ChannelPool(1), SegmentReader(shm_dir))

            def pull(make: Callable[[], object], naive: bool = False, num_tokens: int = num_tokens,
                     runs: int = runs, processes: int = 0) -> tuple[float, float, float]:
                at = addresses[[0, *args.processes].index(processes)]
                return asyncio.run(_pull_gbps(at, shape, num_tokens, runs, make, naive, args.scattered,
                                              processes, shm_dir))

            naive = pull(grpc_puller(1), True)[0]
            by_streams = {s: pull(grpc_puller(s))[0] for s in args.streams}
            by_processes = {n: pull(grpc_puller(n), processes=n)[0] for n in args.processes}
            best = max([*by_streams.values(), *by_processes.values()])
            shm, memcpy, shm_ratio = pull(shm_puller(False))
            shm_crc = pull(shm_puller(True))[0]
            rows.append([shape, num_tokens, round(num_bytes / 1e6, 1), memcpy, tcp, *ceilings, naive,
                         *(by_streams[s] for s in args.streams), *(by_processes[n] for n in args.processes),
                         f"{best / tcp:.0%}", f"{best / ceilings[0]:.0%}",
                         shm, shm_crc, f"{shm_ratio:.0%}"])
            print(f"  {shape} {num_tokens} tokens done", flush=True)
    finally:
        for server in servers:
            server.kill()
    return rows


if __name__ == "__main__":
    main()
