"""`tandem up --prefill-workers 1 --decode-workers 1`: long prompts prefilled on the prefill worker (KV over
shared memory, same host), the same text as transformers, and a SIGKILLed prefill worker costs nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from tandem import procs
from tests.e2e.conftest import Mesh, free_port_run
from tests.e2e.test_mesh import metric, scrape

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"
DECODE, PREFILL = 0, 1  # worker indexes: decode workers first, then prefill workers
LONG_PROMPT = "Meeting notes: " + " ".join(f"item {i} was discussed and agreed." for i in range(60)) + " Summary:"
OTHER_LONG_PROMPT = "Ship log: " + " ".join(f"at hour {i} the wind turned {i % 5} points." for i in range(50)) + " So"


@pytest.fixture(scope="module")
def disagg_mesh(model_path: Path) -> Iterator[Mesh]:
    http_port, grpc_port = procs.free_port(), procs.free_port()
    base = free_port_run(4)
    command = [sys.executable, "-m", "tandem.cli", "up", "--decode-workers", "1", "--prefill-workers", "1",
               "--remote-prefill-threshold", "256", "--port", str(http_port), "--grpc-port", str(grpc_port),
               "--router-port", "0", "--worker-base-port", str(base), "--num-threads", "1", "--num-kv-blocks", "256"]
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    mesh = Mesh(proc, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", base, 2)
    deadline = time.monotonic() + 300
    while not (procs.http_ok(f"{mesh.http_url}/health")
               and all(procs.grpc_serving(mesh.worker_address(i)) for i in (DECODE, PREFILL))):
        if proc.poll() is not None or time.monotonic() > deadline:
            mesh.stop(signal.SIGKILL)
            raise RuntimeError("the disaggregated mesh did not start")
        time.sleep(0.5)
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def reference(model_path: Path) -> dict[str, str]:
    """What transformers generates greedily for the long prompts: the output must not depend on where prefill ran."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    texts = {}
    for prompt in (LONG_PROMPT, OTHER_LONG_PROMPT):
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) > 256
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0][len(ids):]
        texts[prompt] = str(tokenizer.decode(out, skip_special_tokens=True))
    return texts


def complete(mesh: Mesh, prompt: str, max_tokens: int = 12) -> str:
    oai = OpenAI(base_url=f"{mesh.http_url}/v1", api_key="unused", max_retries=0, timeout=300)
    reply = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                   extra_body={"ignore_eos": True})
    return reply.choices[0].text


def worker_metrics(mesh: Mesh, index: int) -> str:
    return scrape(mesh.worker_metrics_url(index))


def wait_idle(mesh: Mesh, indexes: tuple[int, ...], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(metric(worker_metrics(mesh, i), "tandem_worker_kv_blocks_used") == 0 for i in indexes):
            return
        time.sleep(0.1)
    raise AssertionError("KV blocks still in use")


def test_the_prefill_worker_runs_as_its_own_process(disagg_mesh: Mesh) -> None:
    commands = [" ".join(p.cmdline()) for p in disagg_mesh.children()]
    assert any("services.prefill" in c for c in commands) and any("services.decode" in c for c in commands)


def test_long_prompts_are_prefilled_remotely_and_the_text_is_unchanged(disagg_mesh: Mesh,
                                                                       reference: dict[str, str]) -> None:
    assert complete(disagg_mesh, LONG_PROMPT) == reference[LONG_PROMPT]
    assert complete(disagg_mesh, "The capital of France is", max_tokens=4)  # short: prefilled on the decode worker
    decode = worker_metrics(disagg_mesh, DECODE)
    assert metric(decode, "tandem_worker_prefills_total", 'where="remote"') >= 1
    assert metric(decode, "tandem_worker_prefills_total", 'reason="no_hint"') >= 1
    assert metric(decode, "tandem_kv_transfer_received_bytes_total", 'transport="shm"') > 0  # same host
    assert metric(decode, "tandem_kv_transfer_duration_seconds_count") >= 1
    prefill = worker_metrics(disagg_mesh, PREFILL)
    assert metric(prefill, "tandem_prefill_requests_total", 'outcome="ok"') >= 1
    assert metric(prefill, "tandem_kv_leases_ended_total", 'reason="released"') >= 1
    wait_idle(disagg_mesh, (DECODE, PREFILL))


def test_a_killed_prefill_worker_means_local_prefills_with_the_same_text(disagg_mesh: Mesh,
                                                                        reference: dict[str, str]) -> None:
    victim = next(p for p in disagg_mesh.children() if "services.prefill" in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    # At once (the router may still list it: the Prefill call fails) and a little later (it has
    # noticed: no hint at all): prefilled on the decode worker, the same text both times.
    assert complete(disagg_mesh, OTHER_LONG_PROMPT) == reference[OTHER_LONG_PROMPT]
    time.sleep(2)
    assert complete(disagg_mesh, LONG_PROMPT) == reference[LONG_PROMPT]
    wait_idle(disagg_mesh, (DECODE,))
    assert disagg_mesh.proc.poll() is None  # `tandem up` keeps serving without its prefill worker
