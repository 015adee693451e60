"""The whole mesh as a user runs it: `tandem up`, the official openai client, Prometheus scrapes."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time

import httpx
import psutil
import pytest
import torch
from openai import OpenAI

from tandem import procs
from tests.e2e.conftest import Mesh, start_mesh

pytestmark = pytest.mark.e2e
MODEL = "SmolLM2-135M-Instruct"


def client(mesh: Mesh) -> OpenAI:
    return OpenAI(base_url=f"{mesh.http_url}/v1", api_key="unused", max_retries=0, timeout=300)


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of every sample of ``name`` whose label set contains ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and labels in (match.group(1) or ""):
            total += float(match.group(2))
    return total


def scrape(url: str) -> str:
    return httpx.get(url, timeout=10).text


def wait_kv_idle(mesh: Mesh, index: int = 0, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric(scrape(mesh.worker_metrics_url(index)), "tandem_worker_kv_blocks_used") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("KV blocks still in use")


def test_roles_show_in_process_list(mesh: Mesh) -> None:
    commands = [" ".join(p.cmdline()) for p in mesh.children()]
    for role in ("services.router", "services.decode", "services.frontend"):
        assert any(role in c for c in commands), commands


def test_models_and_chat_with_the_openai_client(mesh: Mesh) -> None:
    oai = client(mesh)
    assert [m.id for m in oai.models.list().data] == [MODEL]
    reply = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        max_tokens=30, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0


def test_streamed_and_unary_greedy_agree_and_match_transformers(mesh: Mesh, model_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oai = client(mesh)
    messages = [{"role": "user", "content": "Name three colors."}]
    unary = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == unary.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0][len(ids):]
    assert tokenizer.decode(out, skip_special_tokens=True) == unary.choices[0].message.content


def test_penalties_cross_the_mesh_and_features_it_lacks_are_refused(mesh: Mesh, model_path) -> None:  # type: ignore[no-untyped-def]
    import openai
    from transformers import AutoModelForCausalLM, AutoTokenizer

    oai = client(mesh)
    messages = [{"role": "user", "content": "Say hi."}]
    penalised = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                            extra_body={"repetition_penalty": 1.3})
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=1.3)
    assert penalised.choices[0].message.content == tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)
    def count(**penalties: float) -> str:
        return oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                      **penalties).choices[0].text  # type: ignore[arg-type]

    assert count(frequency_penalty=2.0, presence_penalty=2.0) != count()  # applied, not accepted and dropped
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, logit_bias={"50": 5})
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
    wait_kv_idle(mesh)


def test_logprobs_with_the_openai_client_streamed_and_not(mesh: Mesh) -> None:
    oai = client(mesh)
    done = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                                  logprobs=2)
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == done.usage.completion_tokens == 6
    assert "".join(logprobs.tokens) == done.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert logprob <= 0 and top[token] == logprob and len(top) <= 3
        assert max(top.values()) == logprob  # greedy: the drawn token is the most likely one
    messages = [{"role": "user", "content": "Name a color."}]
    unary = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                        logprobs=True, top_logprobs=2)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs
                for entry in c.choices[0].logprobs.content or []]
    content = unary.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == unary.usage.completion_tokens  # type: ignore[union-attr]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in content)
    plain = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == unary.choices[0].message.content
    # echo: the prompt's own tokens scored first (the first has no logprob), as likelihood evaluations read them
    echoed = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0,
                                    logprobs=1, echo=True)
    scores = echoed.choices[0].logprobs
    assert echoed.choices[0].text == "The capital of France is" + "".join(logprobs.tokens[:2])  # greedy, as above
    assert scores is not None and len(scores.tokens) == echoed.usage.prompt_tokens + 2
    assert scores.token_logprobs[0] is None and all(v <= 0 for v in scores.token_logprobs[1:])
    wait_kv_idle(mesh)


def test_completions_with_text_and_token_prompts(mesh: Mesh) -> None:
    oai = client(mesh)
    text = oai.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
    assert text.choices[0].text.startswith(" 5, 6")
    tokens = oai.completions.create(model=MODEL, prompt=[16, 28, 216, 28, 217, 28], max_tokens=4, temperature=0)
    assert tokens.usage.prompt_tokens == 6 and tokens.choices[0].text


def test_eight_concurrent_requests_share_forward_passes(mesh: Mesh) -> None:
    oai = client(mesh)
    before = metric(scrape(mesh.worker_metrics_url(0)), "tandem_worker_step_batch_size_bucket", 'le="4.0"')
    total_before = metric(scrape(mesh.worker_metrics_url(0)), "tandem_worker_step_batch_size_count")

    def ask(i: int) -> str:
        return oai.completions.create(model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=32,
                                      temperature=0, extra_body={"ignore_eos": True}).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(8)))
    assert all(texts)
    page = scrape(mesh.worker_metrics_url(0))
    steps = metric(page, "tandem_worker_step_batch_size_count") - total_before
    small = metric(page, "tandem_worker_step_batch_size_bucket", 'le="4.0"') - before
    assert steps < 8 * 32  # fewer passes than tokens: requests were batched
    assert small < steps  # some passes carried more than 4 requests
    # All eight went over the frontend's one GenerateStream to the worker.
    assert metric(page, "tandem_worker_generate_streams") == 1
    assert metric(page, "tandem_worker_requests_total", 'outcome="length"') >= 8
    wait_kv_idle(mesh)


def test_prefix_reuse_shows_in_ttft_and_hit_rate(mesh: Mesh) -> None:
    oai = client(mesh)
    system = " ".join(f"Policy {i}: answer politely about item {i * 3}." for i in range(110))

    def ttft(question: str) -> tuple[float, int]:
        started = time.perf_counter()
        stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": system},
                                                                    {"role": "user", "content": question}],
                                             max_tokens=2, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        first = None
        cached = 0
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
            if chunk.usage and chunk.usage.prompt_tokens_details:
                cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
        return first or (time.perf_counter() - started), cached

    cold, cold_cached = ttft("What is item 3?")
    warm, warm_cached = ttft("What is item 6?")
    assert cold_cached == 0 and warm_cached > 1000
    assert warm * 3 < cold, (cold, warm)
    assert metric(scrape(mesh.worker_metrics_url(0)), "tandem_worker_prefix_cache_hit_rate") > 0


def test_client_disconnect_frees_kv_blocks(mesh: Mesh) -> None:
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{mesh.http_url}/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert metric(scrape(mesh.worker_metrics_url(0)), "tandem_worker_kv_blocks_used") > 0
    wait_kv_idle(mesh)


def test_bad_requests_get_openai_errors_and_the_mesh_keeps_serving(mesh: Mesh) -> None:
    url = f"{mesh.http_url}/v1/chat/completions"
    cases = [({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
             ({"model": MODEL, "messages": []}, 400, "messages"),
             ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
             ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
             ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages")]
    for body, status, param in cases:
        reply = httpx.post(url, json=body, timeout=60)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["error"]["param"] == param
    malformed = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert malformed.status_code == 400 and malformed.json()["error"]["message"]
    ok = client(mesh).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert ok.choices[0].message.content is not None
    wait_kv_idle(mesh)


def test_request_id_is_honoured_and_returned(mesh: Mesh) -> None:
    reply = httpx.post(f"{mesh.http_url}/v1/completions", headers={"x-request-id": "e2e-trace-42"},
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "e2e-trace-42"


def test_frontend_metrics_after_traffic(mesh: Mesh) -> None:
    page = scrape(f"{mesh.http_url}/metrics")
    assert metric(page, "tandem_frontend_requests_total", 'endpoint="chat_completions"') > 0
    assert metric(page, "tandem_frontend_time_to_first_token_seconds_count") > 0
    assert metric(page, "tandem_frontend_output_tokens_total") > 0
    # One decode worker and no prefill worker: after the first answer said so, requests start on it
    # without waiting for their Route, and every background answer agreed.
    assert metric(page, "tandem_frontend_routes_total", 'decision="asked"') >= 1
    assert metric(page, "tandem_frontend_routes_total", 'decision="predicted"') > 0
    assert metric(page, "tandem_frontend_route_mispredictions_total") == 0


def test_services_show_process_metrics_and_froze_their_start_up_objects(mesh: Mesh) -> None:
    for url in (f"{mesh.http_url}/metrics", mesh.worker_metrics_url(0)):
        page = scrape(url)
        assert metric(page, "process_resident_memory_bytes") > 50e6, url
        assert metric(page, "process_cpu_seconds_total") > 0, url
        assert metric(page, "python_gc_collections_total", 'generation="0"') > 0, url
        # torch, transformers, gRPC: far more objects than a bare interpreter's, all out of the collector's way
        assert metric(page, "tandem_gc_frozen_objects") > 100_000, url


def test_two_workers_share_load_a_killed_one_is_restarted_and_shutdown_leaves_no_process(model_path) -> None:  # type: ignore[no-untyped-def]
    mesh = start_mesh(2)
    try:
        oai = client(mesh)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: oai.completions.create(model=MODEL, prompt=f"Item {i}:", max_tokens=24,
                                                           extra_body={"ignore_eos": True}), range(6)))
        served = [metric(scrape(mesh.worker_metrics_url(i)), "tandem_worker_requests_total") for i in range(2)]
        assert all(n > 0 for n in served), served
        page = scrape(f"{mesh.http_url}/metrics")  # two workers: every request waits for the router's choice
        assert metric(page, "tandem_frontend_routes_total", 'decision="asked"') == 6
        assert metric(page, "tandem_frontend_routes_total", 'decision="predicted"') == 0
        children = mesh.children()
        assert len(children) == 4
        # A worker that dies (SIGKILL: the OOM killer, say) is started again, and the mesh serves on.
        port = str(mesh.worker_base_port)
        killed = next(c for c in children if "services.decode" in c.cmdline() and port in c.cmdline())
        killed.kill()
        deadline = time.monotonic() + 120
        while not (procs.grpc_serving(mesh.worker_address(0))
                   and any(port in c.cmdline() and c.pid != killed.pid for c in mesh.children())):
            assert time.monotonic() < deadline, "the killed worker was not started again"
            time.sleep(0.25)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda i: oai.completions.create(model=MODEL, prompt=f"Item {i}:", max_tokens=8),
                                 range(4)))
        assert all(out.choices[0].text for out in outs)
        children = mesh.children()
        assert len(children) == 4
    finally:
        code = mesh.stop(signal.SIGINT)
    assert code == 0
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
