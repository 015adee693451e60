"""gRPC KV transfers served by a prefill worker's exporter processes and pulled by a decode worker's
helper processes, with the real model: same output as aggregated serving, faults in either kind of
helper, cancellation, and no helper left behind."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from services.decode.server import DecodeWorker
from services.decode.server import serve as serve_decode
from services.prefill.server import PrefillWorker
from services.prefill.server import serve as serve_prefill
from tandem.kv.transfer.protocol import TransferHandle
from tandem.proto.kv.v1 import kv_pb2, kv_pb2_grpc
from tandem.proto.worker.v1 import worker_pb2_grpc
from tests.integration.test_prefill_disagg import (
    decode_config,
    generate,
    hint,
    prefill_config,
    request,
    sample,
)

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _exporter_pids(worker: PrefillWorker) -> list[int]:
    return list(worker.exporter_pids)


async def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        if not _running(pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"process {pid} outlived SIGKILL")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def prefill(model_path: Path) -> AsyncIterator[PrefillWorker]:
    worker = await serve_prefill(prefill_config(model_path, kv_export_processes=2, kv_transport="grpc"))
    yield worker
    await worker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def aggregated(model_path: Path) -> AsyncIterator[DecodeWorker]:
    worker = await serve_decode(decode_config(model_path))
    yield worker
    await worker.stop(0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def decode(model_path: Path) -> AsyncIterator[DecodeWorker]:
    worker = await serve_decode(decode_config(model_path, kv_transport="grpc", kv_pull_processes=2))
    yield worker
    await worker.stop(0)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def pools_back_to_zero(prefill: PrefillWorker, aggregated: DecodeWorker,
                             decode: DecodeWorker) -> AsyncIterator[None]:
    assert decode.remote_prefill is not None
    decode.remote_prefill.before_pull = None
    yield
    engines = [prefill.engine, aggregated.engine, decode.engine]
    for _ in range(100):
        if not any(engine.stats().num_kv_blocks_used for engine in engines) and not len(prefill.servicer.leases):
            break
        await asyncio.sleep(0.05)
    assert [engine.stats().num_kv_blocks_used for engine in engines] == [0, 0, 0]
    assert len(prefill.servicer.leases) == 0


def _long_prompt(tokenizer: Any, topic: str, repeat: int = 160) -> list[int]:  # >= 16 chunks
    return list(tokenizer(f"Field notes on {topic}: " + f"the {topic} changed again today. " * repeat)["input_ids"])


async def test_helpers_run_as_named_processes_and_handles_list_the_exporters(
        prefill: PrefillWorker, decode: DecodeWorker, tokenizer: Any) -> None:
    assert decode.remote_prefill is not None
    exporters, helpers = _exporter_pids(prefill), decode.remote_prefill.helper_pids
    assert len(exporters) == 2 and len(helpers) == 2
    assert all("services.prefill.exporter" in _cmdline(pid) for pid in exporters)
    assert all("services.decode.pull_helper" in _cmdline(pid) for pid in helpers)
    async with grpc.aio.insecure_channel(prefill.address) as channel:
        stub = kv_pb2_grpc.PrefillServiceStub(channel)
        response = await stub.Prefill(kv_pb2.PrefillRequest(request_id="listed", prompt_token_ids=[1] * 40))
        await stub.ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=response.handle.transfer_id))
    assert len(response.handle.pull_addresses) == 2
    assert not response.handle.HasField("shared_pool")  # --kv-transport grpc: no shared-memory copies offered


async def test_output_through_helper_processes_is_token_identical_to_aggregated(
        prefill: PrefillWorker, aggregated: DecodeWorker, decode: DecodeWorker, tokenizer: Any) -> None:
    cases = [_long_prompt(tokenizer, "tides", 190), _long_prompt(tokenizer, "glaciers"),
             list(tokenizer("The capital of France is")["input_ids"]) * 4]
    assert len(cases[0]) > 1000
    expected = [(await generate(aggregated, request(ids, f"agg-h-{i}")))[0] for i, ids in enumerate(cases)]
    sent = sample(prefill, "tandem_kv_transfer_sent_bytes_total", {"transport": "grpc"})
    remote = decode.remote_prefill
    assert remote is not None
    helper_streams: list[int] = []
    original = remote.grpc_puller._helper_stream  # noqa: SLF001 (counts the streams the helpers ran)

    async def counted(index: int, *args: Any) -> None:
        helper_streams.append(index)
        await original(index, *args)

    remote.grpc_puller._helper_stream = counted  # type: ignore[method-assign]  # noqa: SLF001
    try:
        outputs = await asyncio.gather(*(generate(decode, request(ids, f"helped-{i}", hint(prefill)))
                                         for i, ids in enumerate(cases)))
    finally:
        del remote.grpc_puller._helper_stream  # noqa: SLF001
    assert [tokens for tokens, _ in outputs] == expected
    # Both helpers pulled each long prompt; the short one (under 16 chunks) was pulled in-process.
    assert sorted(helper_streams) == [0, 0, 1, 1]
    received = sample(decode, "tandem_kv_transfer_received_bytes_total", {"transport": "grpc"})
    assert received > 0
    # The exporters' bytes are counted on the prefill worker when their holds end.
    assert sample(prefill, "tandem_kv_transfer_sent_bytes_total", {"transport": "grpc"}) - sent >= received / 2
    assert sample(decode, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"}) == 0


async def test_hold_kv_names_an_unknown_transfer(prefill: PrefillWorker) -> None:
    async with grpc.aio.insecure_channel(prefill.address) as channel:
        call = kv_pb2_grpc.PrefillServiceStub(channel).HoldKv()
        await call.write(kv_pb2.HoldKvRequest(transfer_id="nobody"))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "transfer_id" in (error.value.details() or "")


async def test_an_exporter_names_what_is_wrong_with_a_pull(prefill: PrefillWorker) -> None:
    async with grpc.aio.insecure_channel(prefill.address) as channel:
        stub = kv_pb2_grpc.PrefillServiceStub(channel)
        leased = await stub.Prefill(kv_pb2.PrefillRequest(request_id="bad-pulls", prompt_token_ids=[1] * 40))
    transfer_id = leased.handle.transfer_id
    cases = [
        (kv_pb2.PullKvRequest(transfer_id="nobody", max_chunk_bytes=1 << 20, transport=kv_pb2.KV_TRANSPORT_GRPC),
         grpc.StatusCode.NOT_FOUND, "transfer_id"),
        (kv_pb2.PullKvRequest(transfer_id=transfer_id, max_chunk_bytes=0, transport=kv_pb2.KV_TRANSPORT_GRPC),
         grpc.StatusCode.INVALID_ARGUMENT, "max_chunk_bytes"),
        (kv_pb2.PullKvRequest(transfer_id=transfer_id, max_chunk_bytes=1 << 20, transport=kv_pb2.KV_TRANSPORT_SHM),
         grpc.StatusCode.INVALID_ARGUMENT, "transport"),
        (kv_pb2.PullKvRequest(transfer_id=transfer_id, max_chunk_bytes=1 << 20, sequence_numbers=[99],
                              transport=kv_pb2.KV_TRANSPORT_GRPC), grpc.StatusCode.INVALID_ARGUMENT, "sequence_numbers"),
    ]
    try:
        async with grpc.aio.insecure_channel(leased.handle.pull_addresses[0]) as channel:
            stub = kv_pb2_grpc.PrefillServiceStub(channel)
            for message, code, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in stub.PullKv(message):
                        pass
                assert error.value.code() == code and field in (error.value.details() or ""), field
            chunks = [chunk async for chunk in stub.PullKv(kv_pb2.PullKvRequest(  # and it still serves
                transfer_id=transfer_id, max_chunk_bytes=1 << 20, transport=kv_pb2.KV_TRANSPORT_GRPC))]
            assert len(chunks) == 3 and chunks[0].crc32c
    finally:
        async with grpc.aio.insecure_channel(prefill.address) as channel:
            await kv_pb2_grpc.PrefillServiceStub(channel).ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=transfer_id))


async def test_a_pull_helper_serves_only_its_own_worker(decode: DecodeWorker) -> None:
    remote = decode.remote_prefill
    assert remote is not None and remote.grpc_puller.helpers is not None
    async with grpc.aio.insecure_channel(remote.grpc_puller.helpers.addresses[0]) as channel:
        call = channel.stream_stream("/tandem.kv.v1.KvPullHelper/PullInto",
                                     request_serializer=kv_pb2.PullIntoRequest.SerializeToString,
                                     response_deserializer=kv_pb2.PullIntoResponse.FromString)(
            metadata=(("x-tandem-helper-token", "guessed"),))
        # The helper refuses on the metadata alone, before any request. (A write racing the refusal
        # can fail with grpcio's own INTERNAL "execute_batch" error, which hides the helper's status.)
        async with asyncio.timeout(10):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call.read()
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "x-tandem-helper-token" in (error.value.details() or "")


async def test_a_pull_helper_killed_mid_transfer_costs_a_retry_not_the_output(
        prefill: PrefillWorker, aggregated: DecodeWorker, decode: DecodeWorker, tokenizer: Any) -> None:
    remote = decode.remote_prefill
    assert remote is not None
    victim = remote.helper_pids[0]

    async def kill_helper(transfer_id: str) -> None:  # both helpers' streams are open and waiting for chunks
        if _running(victim):
            await _kill(victim)

    prefill.servicer.before_hold = kill_helper
    try:
        ids = _long_prompt(tokenizer, "lighthouses")
        expected, _ = await generate(aggregated, request(ids, "ref-helper-kill"))
        retried = sample(decode, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"})
        failures = sample(decode, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"})
        tokens, _ = await generate(decode, request(ids, "helper-kill", hint(prefill)))
    finally:
        prefill.servicer.before_hold = None
    assert tokens == expected
    # The dead helper's chunks were asked for again (through the survivor); no local prefill.
    assert sample(decode, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"}) > retried
    assert sample(decode, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"}) == failures
    assert remote.grpc_puller.helpers is not None and len(remote.grpc_puller.helpers.live()) == 1
    tokens, _ = await generate(decode, request(ids[:-3], "after-helper-kill", hint(prefill)))
    assert tokens == (await generate(aggregated, request(ids[:-3], "ref-after-helper-kill")))[0]


async def test_a_killed_exporter_costs_a_retry_not_the_output(
        model_path: Path, aggregated: DecodeWorker, decode: DecodeWorker, tokenizer: Any) -> None:
    victim_worker = await serve_prefill(prefill_config(model_path, num_kv_blocks=160, kv_export_processes=2,
                                                       kv_transport="grpc"))
    remote = decode.remote_prefill
    assert remote is not None
    exporters = _exporter_pids(victim_worker)

    async def kill_exporter(handle: TransferHandle) -> None:
        assert len(handle.pull_addresses) == 2
        await _kill(exporters[0])

    remote.before_pull = kill_exporter
    try:
        ids = _long_prompt(tokenizer, "harbours")
        expected, _ = await generate(aggregated, request(ids, "ref-exporter-kill"))
        retried = sample(decode, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"})
        failures = sample(decode, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"})
        tokens, _ = await generate(decode, request(ids, "exporter-kill", hint(victim_worker)))
        assert tokens == expected
        assert sample(decode, "tandem_kv_transfer_chunk_retries_total", {"transport": "grpc"}) > retried
        assert sample(decode, "tandem_worker_prefills_total", {"where": "local", "reason": "import_failed"}) == failures
        for _ in range(100):
            if not victim_worker.engine.stats().num_kv_blocks_used:
                break
            await asyncio.sleep(0.05)
        assert victim_worker.engine.stats().num_kv_blocks_used == 0
        # The worker noticed (its watch loop): new handles list only the exporter left.
        async with grpc.aio.insecure_channel(victim_worker.address) as channel:
            stub = kv_pb2_grpc.PrefillServiceStub(channel)
            response = await stub.Prefill(kv_pb2.PrefillRequest(request_id="after-kill", prompt_token_ids=[1] * 40))
            await stub.ReleaseKv(kv_pb2.ReleaseKvRequest(transfer_id=response.handle.transfer_id))
        assert len(response.handle.pull_addresses) == 1
    finally:
        remote.before_pull = None
        await victim_worker.stop(0)
    assert not any(_running(pid) for pid in exporters)  # the survivor left with its worker


async def test_a_client_leaving_mid_transfer_frees_blocks_on_both_sides(
        prefill: PrefillWorker, decode: DecodeWorker, tokenizer: Any) -> None:
    in_transfer = asyncio.Event()

    async def stall(transfer_id: str) -> None:  # the exporters' pulls wait here, the helpers' streams with them
        in_transfer.set()
        await asyncio.sleep(30)

    prefill.servicer.before_hold = stall
    try:
        ids = _long_prompt(tokenizer, "canals")
        released = sample(prefill, "tandem_kv_leases_ended_total", {"reason": "released"})
        async with grpc.aio.insecure_channel(decode.address) as channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Generate(request(ids, "helper-leaver", hint(prefill)))
            assert list((await call.read()).delta.token_ids)
            await asyncio.wait_for(in_transfer.wait(), 10)
            assert prefill.engine.stats().num_kv_blocks_used > 0 and decode.engine.stats().num_kv_blocks_used > 0
            call.cancel()
        for _ in range(100):
            if not prefill.engine.stats().num_kv_blocks_used and not decode.engine.stats().num_kv_blocks_used:
                break
            await asyncio.sleep(0.05)
        # Freed by the decode worker's ReleaseKv once its helpers had stopped, long before the lease would.
        assert sample(prefill, "tandem_kv_leases_ended_total", {"reason": "released"}) == released + 1
    finally:
        prefill.servicer.before_hold = None


async def test_helpers_pull_from_a_worker_without_exporters_and_leave_with_their_workers(
        model_path: Path, aggregated: DecodeWorker, tokenizer: Any, tmp_path: Path) -> None:
    import dataclasses

    from tandem.kv.transfer.sweep import owner_token
    from tandem.procinfo import own_identity

    # What a SIGKILLed decode worker of this PID namespace would have left (an earlier process, same pid).
    me = own_identity()
    orphan = tmp_path / f"tandem-kv-pool-{owner_token(dataclasses.replace(me, start_ticks=me.start_ticks - 1))}"
    orphan.write_bytes(b"\0" * 4096)
    prefill = await serve_prefill(prefill_config(model_path, num_kv_blocks=96, kv_transport="grpc"))
    decode = await serve_decode(decode_config(model_path, num_kv_blocks=96, kv_transport="grpc",
                                              kv_pull_processes=1, shm_dir=str(tmp_path)))
    try:
        assert not orphan.exists()  # swept before the worker made its own pool file
        assert [name.startswith("tandem-kv-pool-") for name in os.listdir(tmp_path)] == [True]
        assert decode.remote_prefill is not None and prefill.exporter_pids == []
        ids = _long_prompt(tokenizer, "ferries")
        expected, _ = await generate(aggregated, request(ids, "ref-no-exporters"))
        tokens, _ = await generate(decode, request(ids, "no-exporters", hint(prefill)))
        assert tokens == expected
        assert sample(prefill, "tandem_kv_transfer_sent_bytes_total", {"transport": "grpc"}) > 0  # served by the worker
        assert sample(decode, "tandem_worker_prefills_total", {"where": "remote", "reason": ""}) == 1
        pids = decode.remote_prefill.helper_pids
        assert len(pids) == 1 and all(_running(pid) for pid in pids)
    finally:
        await prefill.stop(0)
        await decode.stop(0)
    assert not any(_running(pid) for pid in pids)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_a_sigkilled_worker_takes_its_helpers_along(model_path: Path, unused_tcp_port: int) -> None:
    import subprocess
    import sys

    from tandem import procs

    worker = subprocess.Popen(  # noqa: ASYNC220 (a test)
        [sys.executable, "-m", "services.decode", "--model", str(model_path), "--port", str(unused_tcp_port),
         "--metrics-port", "0", "--num-threads", "1", "--num-kv-blocks", "64", "--kv-pull-processes", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for _ in range(600):
            if await asyncio.to_thread(procs.grpc_serving, f"127.0.0.1:{unused_tcp_port}"):
                break
            assert worker.poll() is None, "the decode worker exited"
            await asyncio.sleep(0.1)
        helpers = [pid for pid in _children(worker.pid) if "services.decode.pull_helper" in _cmdline(pid)]
        assert len(helpers) == 2
        worker.kill()
        worker.wait()
        for _ in range(100):  # their standard input ends with the worker
            if not any(_running(pid) for pid in helpers):
                break
            await asyncio.sleep(0.05)
        assert not any(_running(pid) for pid in helpers)
    finally:
        worker.kill()
        worker.wait()
