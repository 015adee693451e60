"""The frontend in front of a real router and a real decode worker (HFEngine), all on port 0 in one
process, driven by the official openai client, raw httpx and the native gRPC stub."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest

from services.decode.config import DecodeConfig
from services.decode.server import DecodeWorker
from services.decode.server import serve as serve_decode
from services.frontend import sse
from services.frontend.server import FrontendConfig, RunningFrontend
from services.frontend.server import serve as serve_frontend
from services.router.config import RouterConfig
from services.router.server import RunningRouter
from services.router.server import serve as serve_router
from tandem.proto.api.v1 import api_pb2, api_pb2_grpc
from tandem.proto.common.v1 import common_pb2
from tandem.proto.worker.v1 import worker_pb2, worker_pb2_grpc

pytestmark = pytest.mark.integration

MAX_MODEL_LEN = 256
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
T = TypeVar("T")


@dataclass
class Mesh:
    """Servers on a background event loop, so the tests can use blocking clients."""

    loop: asyncio.AbstractEventLoop
    router: RunningRouter
    worker: DecodeWorker
    frontend: RunningFrontend
    empty_router: RunningRouter  # no worker ever registers here
    empty_frontend: RunningFrontend

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.frontend.http_port}"

    def run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def worker_stats(self) -> worker_pb2.GetStatsResponse:
        with grpc.insecure_channel(f"127.0.0.1:{self.worker.port}") as channel:
            return worker_pb2_grpc.WorkerServiceStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=5)


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mesh(model_path: Path) -> Iterator[Mesh]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mesh-loop", daemon=True)
    thread.start()

    async def start() -> tuple[RunningRouter, DecodeWorker, RunningFrontend, RunningRouter, RunningFrontend]:
        router = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
        worker = await serve_decode(DecodeConfig(
            host="127.0.0.1", port=0, metrics_port=0, router_address=router.address, model=str(model_path),
            num_threads=1, num_kv_blocks=64, max_model_len=MAX_MODEL_LEN, drain_timeout_s=1,
        ))
        frontend_config = dict(model=str(model_path), host="127.0.0.1", http_port=0, grpc_port=0,
                               max_model_len=MAX_MODEL_LEN, shutdown_grace_s=1)
        frontend = await serve_frontend(FrontendConfig(router_address=router.address, **frontend_config))
        empty_router = await serve_router(RouterConfig(host="127.0.0.1", port=0, metrics_port=0))
        empty_frontend = await serve_frontend(FrontendConfig(router_address=empty_router.address,
                                                             retry_after_s=7, **frontend_config))
        return router, worker, frontend, empty_router, empty_frontend

    mesh = Mesh(loop, *asyncio.run_coroutine_threadsafe(start(), loop).result(120))
    _wait_until(lambda: httpx.get(f"{mesh.base_url}/health").status_code == 200, 30, "a healthy worker")
    yield mesh

    async def stop() -> None:
        await mesh.frontend.stop()
        await mesh.empty_frontend.stop()
        await mesh.worker.stop(drain_timeout_s=1)
        await mesh.router.stop(grace_s=0)
        await mesh.empty_router.stop(grace_s=0)

    mesh.run(stop())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


# -- the OpenAI API through the official client -------------------------------------------------

def test_models_lists_the_served_model(client: Any, mesh: Mesh) -> None:
    assert [model.id for model in client.models.list().data] == [mesh.frontend.model_name]


def test_chat_greedy_stream_and_unary_agree(client: Any, mesh: Mesh, tokenizer: Any) -> None:
    unary = client.chat.completions.create(model=mesh.frontend.model_name, messages=CHAT, max_tokens=12,
                                           temperature=0)
    text = unary.choices[0].message.content
    assert text and unary.choices[0].message.role == "assistant"
    assert unary.choices[0].finish_reason in ("stop", "length")
    num_prompt_tokens = len(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))
    assert unary.usage.prompt_tokens == num_prompt_tokens
    assert 0 < unary.usage.completion_tokens <= 12
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + unary.usage.completion_tokens
    if unary.choices[0].finish_reason == "length":
        assert unary.usage.completion_tokens == 12

    chunks = list(client.chat.completions.create(
        messages=CHAT, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
        model=mesh.frontend.model_name))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == num_prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_greedy_stream_and_unary_agree(client: Any, mesh: Mesh, tokenizer: Any) -> None:
    prompt = "The capital of France is"
    unary = client.completions.create(model=mesh.frontend.model_name, prompt=prompt, max_tokens=8, temperature=0)
    text = unary.choices[0].text
    assert text and unary.object == "text_completion"
    assert unary.usage.prompt_tokens == len(tokenizer.encode(prompt))
    stream = list(client.completions.create(model=mesh.frontend.model_name, prompt=prompt, max_tokens=8,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == text
    assert stream[-1].choices[0].finish_reason == unary.choices[0].finish_reason
    # The same prompt as token ids (and as a list of one string) gives the same greedy text.
    by_ids = client.completions.create(model=mesh.frontend.model_name, prompt=tokenizer.encode(prompt),
                                       max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == text
    as_list = client.completions.create(model=mesh.frontend.model_name, prompt=[prompt], max_tokens=8,
                                        temperature=0)
    assert as_list.choices[0].text == text


def test_echo_scores_the_prompt_as_likelihood_evaluations_ask(client: Any, mesh: Mesh, tokenizer: Any) -> None:
    # lm-evaluation-harness scores a continuation this way: the prompt as one token id list, echo,
    # logprobs 1, one new token, and reads token_logprobs / top_logprobs of the prompt's tail.
    model = mesh.frontend.model_name
    context = tokenizer.encode("The capital of France is")
    ahead = client.completions.create(model=model, prompt=context, max_tokens=1, temperature=0, logprobs=1)
    next_id = tokenizer.encode(ahead.choices[0].text)[0]
    scored = client.completions.create(model=model, prompt=[context + [next_id]], max_tokens=1, temperature=0,
                                       logprobs=1, echo=True)
    choice = scored.choices[0]
    prompt_text = tokenizer.decode(context + [next_id])
    assert choice.text.startswith(prompt_text) and len(choice.text) > len(prompt_text)
    lp = choice.logprobs
    assert len(lp.tokens) == len(context) + 2 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # The echoed score of the token greedy picked after the context is what generating it reported.
    assert lp.token_logprobs[len(context)] == pytest.approx(ahead.choices[0].logprobs.token_logprobs[0], abs=1e-4)
    assert max(lp.top_logprobs[len(context)].values()) == lp.token_logprobs[len(context)]  # "is greedy"
    assert scored.usage.prompt_tokens == len(context) + 1 and scored.usage.completion_tokens == 1
    # Streamed: the prompt and its scores come first, in the first chunk; the rest as usual.
    chunks = list(client.completions.create(model=model, prompt=[context + [next_id]], max_tokens=3,
                                            temperature=0, logprobs=1, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith(prompt_text)
    streamed = [v for c in chunks for v in (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])]
    assert streamed[: len(context) + 1] == pytest.approx(lp.token_logprobs[: len(context) + 1], abs=1e-5)
    assert len(streamed) == len(context) + 1 + 3
    # echo without logprobs: the text only, and the prompt is not scored.
    plain = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      echo=True)
    assert plain.choices[0].text.startswith("The capital of France is") and plain.choices[0].logprobs is None
    _wait_until(lambda: mesh.worker_stats().load.num_kv_blocks_used == 0, 10, "the KV pool to empty")


def test_a_batch_of_prompts_gets_n_choices_each_in_order(client: Any, mesh: Mesh, tokenizer: Any) -> None:
    model = mesh.frontend.model_name
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    alone = [client.completions.create(model=model, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    batch = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [alone[0], alone[0], alone[1], alone[1]]  # greedy: n alike
    assert batch.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)  # each prompt once
    assert batch.usage.completion_tokens == 4 * 4
    streamed = list(client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0, n=2,
                                              stream=True, stream_options={"include_usage": True}))
    texts = ["", "", "", ""]
    for chunk in streamed[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in batch.choices]
    assert streamed[-1].usage.prompt_tokens == batch.usage.prompt_tokens
    # As lm-evaluation-harness batches its scoring requests: token id lists, echo, logprobs.
    ids = [tokenizer.encode(p) for p in prompts]
    scored = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    for choice, prompt, prompt_ids in zip(scored.choices, prompts, ids, strict=True):
        assert choice.text.startswith(prompt)
        assert len(choice.logprobs.token_logprobs) == len(prompt_ids) + 1 and choice.logprobs.token_logprobs[0] is None
    refused = httpx.post(f"{mesh.base_url}/v1/completions",
                         json={"model": model, "prompt": ["fine", ""], "max_tokens": 2})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"
    _wait_until(lambda: mesh.worker_stats().load.num_kv_blocks_used == 0, 10, "the KV pool to empty")


def test_tokenize_counts_what_usage_counts_and_detokenize_inverts_it(client: Any, mesh: Mesh, tokenizer: Any) -> None:
    model = mesh.frontend.model_name
    for prefix in ("", "/v1"):
        counted = httpx.post(f"{mesh.base_url}{prefix}/tokenize", json={"model": model, "prompt": "The capital of France is",
                                                                     "return_token_strs": True}).json()
        assert counted["tokens"] == tokenizer.encode("The capital of France is")
        assert counted["count"] == len(counted["tokens"]) and counted["max_model_len"] == MAX_MODEL_LEN
        assert counted["token_strs"] == tokenizer.convert_ids_to_tokens(counted["tokens"])
        text = httpx.post(f"{mesh.base_url}{prefix}/detokenize", json={"model": model, "tokens": counted["tokens"]})
        assert text.json() == {"prompt": "The capital of France is"}
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=1)
    assert completion.usage.prompt_tokens == counted["count"]
    chat = httpx.post(f"{mesh.base_url}/tokenize", json={"model": model, "messages": CHAT}).json()
    answered = client.chat.completions.create(model=model, messages=CHAT, max_tokens=1)
    assert chat["count"] == answered.usage.prompt_tokens and chat["token_strs"] is None
    bare = httpx.post(f"{mesh.base_url}/tokenize", json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert bare["tokens"] == chat["tokens"][: bare["count"]] and bare["count"] < chat["count"]
    for path, body, param, status in [
        ("/tokenize", {"prompt": "x", "messages": CHAT}, "messages", 400),
        ("/tokenize", {}, "prompt", 400),
        ("/tokenize", {"model": "nope", "prompt": "x"}, "model", 404),
        ("/detokenize", {"tokens": [10**7]}, "tokens", 400),
        ("/detokenize", {"tokens": "abc"}, "tokens", 400),
    ]:
        refused = httpx.post(f"{mesh.base_url}{path}", json=body)
        assert refused.status_code == status and refused.json()["error"]["param"] == param, (path, body)


def test_max_completion_tokens_and_seeded_sampling(client: Any, mesh: Mesh) -> None:
    kwargs = dict(model=mesh.frontend.model_name, messages=CHAT, max_completion_tokens=6, temperature=0.9,
                  top_p=0.9, seed=1234, extra_body={"top_k": 50, "ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert first.usage.completion_tokens == 6 and first.choices[0].finish_reason == "length"
    assert first.choices[0].message.content == second.choices[0].message.content


def test_n_choices_streamed_and_not_with_seeds_and_usage(client: Any, mesh: Mesh) -> None:
    kwargs = dict(model=mesh.frontend.model_name, messages=CHAT, max_tokens=6, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    unary = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in unary.choices] == [0, 1, 2]
    texts = [c.message.content for c in unary.choices]
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert unary.usage.completion_tokens == 18 and unary.usage.total_tokens == unary.usage.prompt_tokens + 18
    single = client.chat.completions.create(**kwargs)
    assert single.choices[0].message.content == texts[0]  # choice 0 is the request with n=1
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True},
                                                 **kwargs))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2] and chunks[-1].usage.completion_tokens == 18
    completion = client.completions.create(model=mesh.frontend.model_name, prompt="The capital of France is",
                                           max_tokens=4, temperature=0, n=2)
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.choices[0].text == completion.choices[1].text  # greedy: the same twice
    _wait_worker_idle(mesh)


def test_a_client_leaving_an_n_stream_frees_every_choice(mesh: Mesh) -> None:
    _wait_worker_idle(mesh)
    num_aborts = _num_worker_aborts(mesh)
    body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}
    with httpx.stream("POST", f"{mesh.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        num_events = 0
        for line in response.iter_lines():
            num_events += line.startswith("data:")
            if num_events == 6:
                break
    _wait_worker_idle(mesh)
    assert _num_worker_aborts(mesh) == num_aborts + 2


# -- raw HTTP: SSE framing, request ids, errors --------------------------------------------------

def test_sse_stream_ends_with_done_and_echoes_request_id(mesh: Mesh) -> None:
    response = httpx.post(f"{mesh.base_url}/v1/chat/completions", headers={"x-request-id": "test-sse-1"},
                          json={"messages": CHAT, "max_tokens": 4, "stream": True}, timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"] == "test-sse-1"
    events = sse.decode_events(response.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-test-sse-1"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v2/models/{model}/generate_stream"])
def test_stream_headers_leave_with_the_first_event(mesh: Mesh, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """One send, not two: the status line and the first token's event reach the client together."""
    sent: list[bytes] = []
    transport = asyncio.selector_events._SelectorSocketTransport  # the test mesh's loop is asyncio's
    write, writelines = transport.write, transport.writelines

    def record_write(self: Any, data: bytes) -> None:
        sent.append(bytes(data))
        write(self, data)

    def record_writelines(self: Any, lines: Any) -> None:
        lines = [bytes(line) for line in lines]
        sent.append(b"".join(lines))
        writelines(self, lines)

    monkeypatch.setattr(transport, "write", record_write)
    monkeypatch.setattr(transport, "writelines", record_writelines)
    body = ({"messages": CHAT, "max_tokens": 4, "stream": True} if path.startswith("/v1")
            else {"text_input": "Hi", "parameters": {"max_tokens": 4, "stream": True}})
    response = httpx.post(f"{mesh.base_url}{path.format(model=mesh.frontend.model_name)}", json=body, timeout=60)
    assert response.status_code == 200 and sse.decode_events(response.content)
    first = next(data for data in sent if data.startswith(b"HTTP/1.1 200"))
    assert b"\r\n\r\n" in first and b"data: {" in first.split(b"\r\n\r\n", 1)[1]


def test_request_id_generated_when_absent(mesh: Mesh) -> None:
    response = httpx.post(f"{mesh.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert response.status_code == 200 and response.headers["x-request-id"].startswith("cmpl-")


def _error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 99}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "stop": 3, "stream": True}, "stop"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, -3]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "top_k": "x"}, "top_k"),
])
def test_bad_input_is_400_naming_the_param(mesh: Mesh, path: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{mesh.base_url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_malformed_json_is_400(mesh: Mesh) -> None:
    response = httpx.post(f"{mesh.base_url}/v1/chat/completions", content=b'{"messages": [',
                          headers={"content-type": "application/json", "x-request-id": "bad-json"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "bad-json"
    assert _error(response)["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400_with_both_lengths(mesh: Mesh) -> None:
    response = httpx.post(f"{mesh.base_url}/v1/completions",
                          json={"prompt": [1] * 250, "max_tokens": 10}, timeout=30)
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "prompt"
    assert str(MAX_MODEL_LEN) in error["message"] and "260" in error["message"]


def test_unknown_model_is_404(client: Any, mesh: Mesh) -> None:
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    response = httpx.post(f"{mesh.base_url}/v1/completions", json={"model": "gpt-4o", "prompt": "x"})
    assert response.status_code == 404
    assert _error(response)["param"] == "model"


def test_no_healthy_worker_is_503_with_retry_after(mesh: Mesh) -> None:
    base = f"http://127.0.0.1:{mesh.empty_frontend.http_port}"
    for stream in (False, True):
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT, "stream": stream})
        assert response.status_code == 503 and response.headers["retry-after"] == "7"  # --retry-after-s
        assert "no healthy worker" in _error(response)["message"]
    assert httpx.get(f"{base}/health").status_code == 503
    assert httpx.get(f"{base}/live").status_code == 200


def test_health_and_live(mesh: Mesh) -> None:
    health = httpx.get(f"{mesh.base_url}/health")
    assert health.status_code == 200 and health.json()["num_healthy_workers"] == 1
    assert httpx.get(f"{mesh.base_url}/live").status_code == 200


def test_metrics_after_requests(mesh: Mesh) -> None:
    httpx.post(f"{mesh.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{mesh.base_url}/metrics").text
    name = mesh.frontend.model_name
    assert (f'tandem_frontend_requests_total{{endpoint="completions",model="{name}",request_type="unary",'
            'status="success"}') in text
    for metric in ("tandem_frontend_time_to_first_token_seconds_bucket", "tandem_frontend_inflight_requests",
                   "tandem_frontend_inter_token_latency_seconds_bucket", "tandem_frontend_output_tokens_total",
                   "tandem_frontend_request_duration_seconds_bucket", "tandem_frontend_input_sequence_tokens",
                   "tandem_frontend_output_sequence_tokens"):
        assert metric in text
    assert 'status="invalid_argument"' in text  # the 400s above were counted too


# -- cancellation frees the worker's KV blocks ---------------------------------------------------

def _num_worker_aborts(mesh: Mesh) -> float:
    value = mesh.worker.metrics.registry.get_sample_value("tandem_worker_requests_total", {"outcome": "abort"})
    return value or 0.0


def _wait_worker_idle(mesh: Mesh) -> None:
    def idle() -> bool:
        stats = mesh.worker_stats()
        return stats.load.num_kv_blocks_used == 0 and stats.load.num_running == 0 and stats.load.num_waiting == 0
    _wait_until(idle, 15, "the worker to free every KV block")


def test_client_disconnect_mid_stream_frees_kv_blocks(mesh: Mesh) -> None:
    _wait_worker_idle(mesh)
    num_aborts = _num_worker_aborts(mesh)
    body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{mesh.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        num_events = 0
        for line in lines:
            num_events += line.startswith("data:")
            if num_events == 4:
                break
        assert mesh.worker_stats().load.num_kv_blocks_used > 0  # the request is running
    # Leaving the block closed the connection mid-stream: the worker aborts (not finishes) the request.
    _wait_worker_idle(mesh)
    assert _num_worker_aborts(mesh) == num_aborts + 1


def test_client_disconnect_during_unary_request_frees_kv_blocks(mesh: Mesh) -> None:
    # Nothing is written to a unary response until the end, so only handler cancellation
    # (aiohttp noticing the closed connection) can stop the worker early.
    _wait_worker_idle(mesh)
    num_aborts = _num_worker_aborts(mesh)
    body = {"messages": CHAT, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{mesh.base_url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=1.0))
    _wait_worker_idle(mesh)
    assert _num_worker_aborts(mesh) == num_aborts + 1


def test_grpc_cancel_frees_kv_blocks(mesh: Mesh) -> None:
    _wait_worker_idle(mesh)
    num_aborts = _num_worker_aborts(mesh)
    with grpc.insecure_channel(f"127.0.0.1:{mesh.frontend.grpc_port}") as channel:
        call = api_pb2_grpc.GenerationServiceStub(channel).Generate(api_pb2.GenerateRequest(
            text="Once upon a time", sampling=common_pb2.SamplingParams(max_tokens=200, ignore_eos=True)))
        for _ in zip(range(3), call, strict=False):
            pass
        assert mesh.worker_stats().load.num_kv_blocks_used > 0
        call.cancel()
    _wait_worker_idle(mesh)
    assert _num_worker_aborts(mesh) == num_aborts + 1


# -- the native gRPC API -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native(mesh: Mesh) -> Iterator[api_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.frontend.grpc_port}") as channel:
        yield api_pb2_grpc.GenerationServiceStub(channel)


def test_native_generate_matches_the_completions_api(native: Any, client: Any, mesh: Mesh) -> None:
    prompt = "The capital of France is"
    call = native.Generate(api_pb2.GenerateRequest(
        text=prompt, request_id="native-1", sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0)),
        timeout=60)
    responses = list(call)
    assert {r.request_id for r in responses} == {"native-1"}
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    token_ids = [t for r in responses for t in r.delta.token_ids]
    assert last.usage.completion_tokens == len(token_ids) > 0
    expected = client.completions.create(model=mesh.frontend.model_name, prompt=prompt, max_tokens=8,
                                         temperature=0)
    assert "".join(r.delta.text for r in responses) == expected.choices[0].text
    assert last.usage.prompt_tokens == expected.usage.prompt_tokens


def test_native_token_id_prompt_and_list_models(native: Any, mesh: Mesh) -> None:
    responses = list(native.Generate(api_pb2.GenerateRequest(
        token_ids=api_pb2.TokenIds(ids=[504, 3458]), sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60))
    assert responses[-1].usage.prompt_tokens == 2 and responses[-1].usage.completion_tokens <= 3
    assert not any(r.prompt_logprobs for r in responses)
    # The prompt scored: its second and third tokens' logprobs, with 2 alternatives, on the first response.
    scored = list(native.Generate(api_pb2.GenerateRequest(
        token_ids=api_pb2.TokenIds(ids=[504, 3458, 282]), sampling=common_pb2.SamplingParams(
            max_tokens=2, prompt_logprobs=2)), timeout=60))
    assert [e.token_id for e in scored[0].prompt_logprobs] == [3458, 282]
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in scored[0].prompt_logprobs)
    assert not any(r.prompt_logprobs for r in scored[1:])
    models = native.ListModels(api_pb2.ListModelsRequest()).models
    assert [(m.name, m.max_model_len) for m in models] == [(mesh.frontend.model_name, MAX_MODEL_LEN)]


@pytest.mark.parametrize(("request_fields", "code", "field"), [
    ({"model": "nope", "text": "x"}, grpc.StatusCode.NOT_FOUND, "model"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"text": "x", "request_id": "has space"}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ({"text": "x", "sampling": common_pb2.SamplingParams(top_p=1.5)}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"token_ids": api_pb2.TokenIds(ids=[1] * 300)}, grpc.StatusCode.INVALID_ARGUMENT, str(MAX_MODEL_LEN)),
])
def test_native_errors_name_the_field(native: Any, request_fields: dict[str, Any], code: grpc.StatusCode,
                                      field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(native.Generate(api_pb2.GenerateRequest(**request_fields), timeout=30))
    assert info.value.code() == code and field in info.value.details()


def test_native_no_worker_is_unavailable(mesh: Mesh) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{mesh.empty_frontend.grpc_port}") as channel:
        stub = api_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(api_pb2.GenerateRequest(text="hi"), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
