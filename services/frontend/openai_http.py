"""The OpenAI-compatible HTTP API (chat/completions, completions, models) plus /health, /live, /metrics."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.frontend import choices, sse
from services.frontend import openai_responses as responses
from services.frontend.openai_protocol import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from services.frontend.pipeline import GenerationRequest, Pipeline, is_valid_request_id
from services.frontend.routing import parse_routing_overrides
from tandem.engine.types import RequestOutput, TokenLogprob
from tandem.errors import InvalidRequest, TandemError
from tandem.telemetry.logging import REQUEST_ID_HEADER

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
MAX_BODY_BYTES = 32 * 1024 * 1024  # a full-context token-id prompt as JSON is well below this


RETRY_AFTER_S = web.AppKey("retry_after_s", int)


def request_id_for(header_value: str | None) -> str:
    """The client's x-request-id when it is safe to forward as gRPC metadata, else a fresh one."""
    if header_value and is_valid_request_id(header_value):
        return header_value
    return f"cmpl-{uuid.uuid4().hex}"


def json_error(error: responses.ErrorResponse) -> web.Response:
    headers = {"Retry-After": str(error.retry_after_s)} if error.retry_after_s is not None else None
    return web.json_response(error.body, status=error.status, headers=headers)


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind the request id for logs and echo it; turn every failure into an OpenAI error body."""
    request_id = request_id_for(request.headers.get(REQUEST_ID_HEADER))
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        try:
            response = await handler(request)
        except TandemError as exc:
            response = json_error(responses.error_response(exc, request.app.get(RETRY_AFTER_S, 1)))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = json_error(responses.ErrorResponse(exc.status, responses.error_body(
                exc.reason, "invalid_request_error" if exc.status < 500 else "server_error", None, None)))
        except Exception:
            log.exception("request failed", path=request.path)
            response = json_error(responses.ErrorResponse(500, responses.error_body(
                "internal server error; the request id is in the x-request-id header",
                "server_error", None, "internal_error")))
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


class OpenAIHttpApi:
    """aiohttp handlers on top of the shared pipeline."""

    def __init__(self, pipeline: Pipeline, *, is_draining: Callable[[], bool] = lambda: False,
                 retry_after_s: int = 1) -> None:
        self.pipeline = pipeline
        self.is_draining = is_draining
        self.retry_after_s = retry_after_s
        self.created = int(time.time())

    def add_routes(self, app: web.Application) -> None:
        app[RETRY_AFTER_S] = self.retry_after_s  # read by the error middleware
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        for prefix in ("", "/v1"):  # vLLM serves these at the root; some clients add /v1
            app.router.add_post(f"{prefix}/tokenize", self.tokenize)
            app.router.add_post(f"{prefix}/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_get("/live", self.live)
        app.router.add_get("/metrics", self.metrics)

    # -- generation endpoints ----------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        endpoint, stream = "chat_completions", False
        try:
            body = await _read_json(request)
            stream = isinstance(body, dict) and body.get("stream") is True
            parsed = parse_chat_request(body)
            self.pipeline.check_model(parsed.model)
            prompt_ids = self.pipeline.apply_chat_template(parsed.messages)
            self.pipeline.validate_prompt(prompt_ids, parsed.sampling, "messages")
            routing = parse_routing_overrides(body)
        except TandemError as exc:
            self._count_rejected(endpoint, stream, exc)
            raise
        generation = GenerationRequest(request[REQUEST_ID], prompt_ids, parsed.sampling, endpoint, parsed.stream,
                                       routing)
        header = self._header("chatcmpl-", request[REQUEST_ID])
        wants_logprobs = parsed.sampling.logprobs is not None
        generations = choices.choices_of(generation, parsed.n)
        if not parsed.stream:
            results = await choices.collect_all(self.pipeline, generations)
            return self._json(request, choices.merge_choices([responses.chat_completion(
                header, r.text, r.last.finish_reason, choices.usage_of(r.last),
                responses.chat_logprobs(r.logprobs, self._token_text) if wants_logprobs else None)
                for r in results], choices.total_usage([r.last for r in results], len(results))))
        pending = [_PendingLogprobs() for _ in generations]

        def chunks(output: RequestOutput, first: bool, index: int) -> list[dict[str, Any]]:
            out = []
            if first:  # the role travels alone in the first chunk, as OpenAI sends it
                out.append(responses.chat_chunk(header, role="assistant", content="",
                                                include_usage=parsed.include_usage))
            pending[index].add(output)
            if output.text or output.finished:
                out.append(responses.chat_chunk(
                    header, content=output.text or None, finish_reason=output.finish_reason,
                    include_usage=parsed.include_usage,
                    logprobs=(responses.chat_logprobs(pending[index].take(), self._token_text)
                              if wants_logprobs else None)))
            return out

        return await self._stream(request, generations, chunks, "chat.completion.chunk", header,
                                  parsed.include_usage, len(generations))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        endpoint, stream = "completions", False
        try:
            body = await _read_json(request)
            stream = isinstance(body, dict) and body.get("stream") is True
            parsed = parse_completion_request(body)
            self.pipeline.check_model(parsed.model)
            batch: list[list[int]] = []  # each prompt's token ids
            echoed: list[str] = []  # echo: each prompt as sent, or the text of its token ids
            for prompt in parsed.prompts:
                batch.append(self.pipeline.tokenize(prompt) if isinstance(prompt, str) else prompt)
                if parsed.echo:
                    echoed.append(prompt if isinstance(prompt, str) else self.pipeline.tokenizer.decode(prompt))
                self.pipeline.validate_prompt(batch[-1], parsed.sampling, "prompt")
            routing = parse_routing_overrides(body)
        except TandemError as exc:
            self._count_rejected(endpoint, stream, exc)
            raise
        n = parsed.n
        # Choice i*n + j is choice j of prompt i, as OpenAI orders a batch's choices.
        generations = [g for i, ids in enumerate(batch) for g in choices.choices_of(GenerationRequest(
            request[REQUEST_ID] if len(batch) == 1 else f"{request[REQUEST_ID]}-p{i}", ids, parsed.sampling,
            endpoint, parsed.stream, routing), n)]
        header = self._header("cmpl-", request[REQUEST_ID])
        wants_logprobs = parsed.sampling.logprobs is not None

        def echo_of(index: int) -> str:
            return echoed[index // n] if parsed.echo else ""

        def logprobs_of(index: int, entries: list[TokenLogprob], text_offset: int,
                        prompt_scores: list[TokenLogprob] | None) -> dict[str, Any]:
            """Choice ``index``'s logprobs object; with ``prompt_scores`` its echoed prompt's go first."""
            logprobs = responses.completion_logprobs(entries, self._token_text, text_offset)
            if prompt_scores is None:
                return logprobs
            return responses.prepend_prompt_logprobs(batch[index // n], prompt_scores, self._token_text, logprobs)

        if not parsed.stream:
            results = await choices.collect_all(self.pipeline, generations)
            bodies = []
            for index, r in enumerate(results):
                logprobs = None
                if wants_logprobs:
                    logprobs = logprobs_of(index, r.logprobs, len(echo_of(index)),
                                           r.prompt_logprobs if parsed.echo else None)
                bodies.append(responses.completion(header, echo_of(index) + r.text, r.last.finish_reason,
                                                   choices.usage_of(r.last), logprobs))
            return self._json(request, choices.merge_choices(bodies, choices.total_usage([r.last for r in results], n)))
        pending = [_PendingLogprobs() for _ in generations]

        def chunks(output: RequestOutput, first: bool, index: int) -> list[dict[str, Any]]:
            waiting = pending[index]
            waiting.add(output)
            echo = parsed.echo and first  # the prompt goes first, in the choice's first chunk
            if not output.text and not output.finished and not echo:
                return []
            logprobs = None
            if wants_logprobs:
                if echo:
                    waiting.text_offset = len(echo_of(index))
                logprobs = logprobs_of(index, waiting.take(), waiting.text_offset,
                                       (output.prompt_logprobs or []) if echo else None)
                waiting.text_offset += len(output.text)
            text = echo_of(index) + output.text if echo else output.text
            return [responses.completion_chunk(header, text, output.finish_reason, parsed.include_usage, logprobs)]

        return await self._stream(request, generations, chunks, "text_completion", header, parsed.include_usage, n)

    def _token_text(self, token_id: int) -> str:
        return str(self.pipeline.tokenizer.decode([token_id]))

    async def _stream(
        self, request: web.Request, generations: list[GenerationRequest],
        chunks: Callable[[RequestOutput, bool, int], list[dict[str, Any]]],
        object_name: str, header: responses.ResponseHeader, include_usage: bool, choices_per_prompt: int,
    ) -> web.StreamResponse:
        async with aclosing(choices.outputs_of(self.pipeline, generations)) as outputs:
            # Wait for the first output before sending headers, so that "no worker" or "queue
            # full" still reach the client as a proper 503 instead of an event in a 200 stream.
            try:
                index, output = await anext(outputs)
            except StopAsyncIteration:
                raise TandemError("the worker stream ended without a result") from None
            response = sse.SseResponse(headers={
                "Content-Type": sse.CONTENT_TYPE, "Cache-Control": "no-cache",
                REQUEST_ID_HEADER: request[REQUEST_ID],
            })
            started: set[int] = set()
            finals: dict[int, RequestOutput] = {}  # by choice index
            # One write per output, and one for the whole end of the stream: the events of an output
            # (the first token's role and text; the last one's text, usage, [DONE] and the closing
            # chunk) leave together, one send instead of up to four.
            tail: list[bytes] = []
            try:
                await response.prepare(request)  # the headers leave with the first write
                while True:
                    events = []
                    for chunk in chunks(output, index not in started, index):
                        chunk["choices"][0]["index"] = index
                        events.append(sse.encode_event(chunk))
                    started.add(index)
                    if output.finished:
                        finals[index] = output
                        if len(finals) == len(generations):
                            tail = events
                            break
                    if events:
                        await response.write(b"".join(events))
                    index, output = await anext(outputs)
                if include_usage:
                    tail.append(sse.encode_event(responses.usage_chunk(
                        header, object_name, choices.total_usage([finals[i] for i in sorted(finals)], choices_per_prompt))))
            except TandemError as exc:
                # Headers are gone: report the failure in-band, as OpenAI-compatible servers do.
                log.warning("stream failed", error=exc.message, code=exc.code)
                tail = [sse.encode_event(responses.error_response(exc).body)]
            except ConnectionResetError:
                # The client went away; leaving the aclosing block cancels the worker call.
                log.info("client disconnected mid-stream")
                return response
            tail.append(sse.DONE)
            await response.write_eof(b"".join(tail))
            return response

    # -- everything else ---------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        return self._json(request, responses.model_list(self.pipeline.model_name, self.created,
                                                        self.pipeline.max_model_len))

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM's /tokenize: the token ids a prompt or chat becomes here (what usage.prompt_tokens counts)."""
        parsed = parse_tokenize_request(await _read_json(request))
        self.pipeline.check_model(parsed.model)
        if parsed.messages is not None:
            ids = self.pipeline.apply_chat_template(parsed.messages, parsed.add_generation_prompt)
        else:
            assert parsed.text is not None
            ids = self.pipeline.tokenize(parsed.text, parsed.add_special_tokens)
        token_strs = self.pipeline.tokenizer.convert_ids_to_tokens(ids) if parsed.return_token_strs else None
        return self._json(request, {"count": len(ids), "max_model_len": self.pipeline.max_model_len, "tokens": ids,
                                    "token_strs": token_strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        """vLLM's /detokenize: the text of token ids."""
        model, ids = parse_detokenize_request(await _read_json(request))
        self.pipeline.check_model(model)
        self.pipeline.validate_token_ids(ids, "tokens")
        return self._json(request, {"prompt": self.pipeline.tokenizer.decode(ids)})

    async def health(self, request: web.Request) -> web.Response:
        if self.is_draining():
            return web.json_response({"status": "draining"}, status=503)
        num_healthy = await self.pipeline.num_healthy_workers()
        body = {"status": "healthy" if num_healthy else "unhealthy", "num_healthy_workers": num_healthy}
        return web.json_response(body, status=200 if num_healthy else 503)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.pipeline.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _header(self, prefix: str, request_id: str) -> responses.ResponseHeader:
        response_id = prefix + request_id.removeprefix("cmpl-")  # no "chatcmpl-cmpl-..."
        return responses.ResponseHeader(response_id, int(time.time()), self.pipeline.model_name)

    @staticmethod
    def _json(request: web.Request, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, dumps=_dumps)

    def _count_rejected(self, endpoint: str, stream: bool, exc: TandemError) -> None:
        self.pipeline.metrics.count_request(self.pipeline.model_name, endpoint,
                                            "stream" if stream else "unary", exc.code)


class _PendingLogprobs:
    """Logprobs of a stream's tokens not sent yet: a token whose text is held back (an unfinished
    character, a possible stop string) sends its logprob with the chunk that carries its text."""

    def __init__(self) -> None:
        self._entries: list[TokenLogprob] = []
        self.text_offset = 0  # completions: characters of the completion sent so far

    def add(self, output: RequestOutput) -> None:
        self._entries.extend(output.logprobs or ())

    def take(self) -> list[TokenLogprob]:
        entries, self._entries = self._entries, []
        return entries


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def create_app(api: OpenAIHttpApi) -> web.Application:
    app = web.Application(middlewares=[request_context], client_max_size=MAX_BODY_BYTES)
    api.add_routes(app)
    return app


__all__ = ["OpenAIHttpApi", "create_app", "request_context", "request_id_for"]
