"""The KServe v2 HTTP endpoints on the frontend's HTTP port: health, metadata, config,
POST .../infer (JSON tensors with the binary-data extension, as tritonclient.http sends them)
and Triton's generate extension (POST .../generate and .../generate_stream as SSE)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import structlog
from aiohttp import web

from services.frontend import sse
from services.frontend.kserve.codec import (
    FLOAT_DATATYPES,
    INTEGER_DATATYPES,
    ParameterValue,
    Tensor,
    decode_json_input,
    encode_json_output,
)
from services.frontend.kserve.model import (
    INPUTS_BY_NAME,
    MODEL_VERSION,
    model_config,
    model_metadata,
    server_metadata,
)
from services.frontend.kserve.service import KServeFrontend, Prepared, ReadyCheck
from services.frontend.pipeline import Pipeline
from tandem.errors import InvalidRequest, TandemError

log = structlog.get_logger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"  # JSON part of a binary-extension body
HTTP_STATUS = {"invalid_argument": 400, "not_found": 404, "unavailable": 503, "resource_exhausted": 429}
_MODEL = "/v2/models/{model}"
_VERSIONED = "/v2/models/{model}/versions/{version}"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: TandemError) -> web.Response:
    """Triton's error body: {"error": message}."""
    return web.json_response({"error": error.message}, status=HTTP_STATUS.get(error.code, 500))


class KServeHttp:
    def __init__(self, frontend: KServeFrontend) -> None:
        self.frontend = frontend

    # -- health and metadata ------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.frontend.ready() else 400)  # as Triton

    async def model_ready(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except TandemError:
            return web.Response(status=400)
        return web.Response(status=200 if await self.frontend.ready() else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except TandemError as exc:
            return error_response(exc)
        return web.json_response(model_metadata(self.frontend.model_name))

    async def model_config(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request)
        except TandemError as exc:
            return error_response(exc)
        return web.json_response(model_config(self.frontend.model_name, self.frontend.pipeline.max_model_len))

    async def repository_index(self, request: web.Request) -> web.Response:
        try:
            body = await _json_body(request, allow_empty=True)
        except TandemError as exc:
            return error_response(exc)
        ready = await self.frontend.ready()
        if not ready and isinstance(body, dict) and body.get("ready") is True:
            return web.json_response([])
        return web.json_response([{"name": self.frontend.model_name, "version": MODEL_VERSION,
                                   "state": "READY" if ready else "UNAVAILABLE"}])

    def _check_model(self, request: web.Request) -> None:
        self.frontend.check_model(request.match_info["model"], request.match_info.get("version", ""))

    # -- inference ----------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        """The v2 inference protocol: JSON tensors, any of them as binary data after the JSON."""
        endpoint = "kserve_infer"
        try:
            try:
                message, parameters, tensors, binary_outputs = await _read_infer_body(request)
            except TandemError as exc:
                self.frontend.count_rejected(endpoint, {}, exc)
                raise
            prepared = self.frontend.prepare(
                model_name=request.match_info["model"], version=request.match_info.get("version", ""),
                tensors=tensors, parameters=parameters, requested_outputs=list(binary_outputs),
                endpoint=endpoint, streaming_endpoint=False, request_id=request.get("request_id"),
            )
            tensors_out = await self.frontend.complete(prepared)
        except TandemError as exc:
            return error_response(exc)
        binary_default = parameters.get("binary_data_output") is True
        reply: dict[str, Any] = {"model_name": self.frontend.model_name, "model_version": MODEL_VERSION}
        if isinstance(message.get("id"), str):
            reply["id"] = message["id"]
        reply["outputs"], chunks = [], []
        for tensor in tensors_out:
            wanted = binary_outputs.get(tensor.name)
            obj, data = encode_json_output(tensor, binary=binary_default if wanted is None else wanted)
            reply["outputs"].append(obj)
            if data is not None:
                chunks.append(data)
        if not chunks:
            return web.json_response(reply)
        header = json.dumps(reply).encode()
        return web.Response(body=header + b"".join(chunks), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(header))})

    async def generate(self, request: web.Request) -> web.Response:
        try:
            prepared, request_id = await self._prepare_generate(request, "kserve_generate", streaming=False)
            tensors = await self.frontend.complete(prepared)
        except TandemError as exc:
            return error_response(exc)
        return web.json_response(self._generate_reply(tensors, request_id))

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events, one per response; an error after the first event is an event too."""
        try:
            prepared, request_id = await self._prepare_generate(request, "kserve_generate_stream", streaming=True)
        except TandemError as exc:
            return error_response(exc)
        async with aclosing(self.frontend.run(prepared, stream=prepared.kserve.stream)) as chunks:
            # The first chunk comes before the headers, so that "no worker" or "queue full" still
            # reach the client as an HTTP status rather than an event in a 200 stream.
            try:
                chunk = await anext(chunks)
            except TandemError as exc:
                return error_response(exc)
            response = sse.SseResponse(headers={"Content-Type": sse.CONTENT_TYPE, "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                await _send_event(response, self._generate_reply(chunk.tensors, request_id))
                async for chunk in chunks:
                    await _send_event(response, self._generate_reply(chunk.tensors, request_id))
            except TandemError as exc:
                await _send_event(response, {"error": exc.message})
            except ConnectionResetError:  # the client left; leaving aclosing aborts the request
                return response
        await response.write_eof()
        return response

    async def _prepare_generate(self, request: web.Request, endpoint: str,
                                *, streaming: bool) -> tuple[Prepared, str | None]:
        """The generate extension: top-level keys are input tensors, "parameters" the parameters."""
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise InvalidRequest("the request body must be a JSON object", "body")
            request_id = body.get("id") if isinstance(body.get("id"), str) else None
            parameters = _parameters(body.get("parameters"), "parameters")
            tensors = {key: _generate_tensor(key, value) for key, value in body.items()
                       if key not in ("id", "parameters")}
        except TandemError as exc:
            self.frontend.count_rejected(endpoint, {}, exc)
            raise
        prepared = self.frontend.prepare(
            model_name=request.match_info["model"], version=request.match_info.get("version", ""),
            tensors=tensors, parameters=parameters, requested_outputs=[], endpoint=endpoint,
            streaming_endpoint=streaming, request_id=request.get("request_id"),
        )
        return prepared, request_id

    def _generate_reply(self, tensors: list[Tensor], request_id: str | None) -> dict[str, Any]:
        reply: dict[str, Any] = {"model_name": self.frontend.model_name, "model_version": MODEL_VERSION}
        if request_id is not None:
            reply["id"] = request_id
        for tensor in tensors:
            values = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in tensor.values]
            reply[tensor.name] = values[0] if len(values) == 1 else values
        return reply


async def _send_event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")


async def _json_body(request: web.Request, allow_empty: bool = False) -> Any:
    body = await request.read()
    if not body and allow_empty:
        return None
    return _json_object(body, any_type=True)


def _json_object(data: bytes, any_type: bool = False) -> Any:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", "body") from None
    if not any_type and not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object", "body")
    return value


async def _read_infer_body(
    request: web.Request,
) -> tuple[dict[str, Any], dict[str, ParameterValue], dict[str, Tensor], dict[str, bool | None]]:
    """The JSON message, its parameters, its input tensors and the requested outputs (name ->
    binary_data wish, None: the request's default)."""
    json_part, binary = _split_body(await request.read(), request.headers.get(HEADER_LENGTH))
    message = _json_object(json_part)
    parameters = _parameters(message.get("parameters"), "parameters")
    tensors = _decode_inputs(message.get("inputs"), binary)
    outputs = message.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidRequest("outputs must be a list of objects with a name", "outputs")
    binary_outputs: dict[str, bool | None] = {}
    for output in outputs:
        wish = _parameters(output.get("parameters"), "outputs").get("binary_data")
        binary_outputs[output["name"]] = wish if isinstance(wish, bool) else None
    return message, parameters, tensors, binary_outputs


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} {header_length!r} does not fit a body of {len(body)} bytes",
                             HEADER_LENGTH)
    return body[:length], body[length:]


def _parameters(value: Any, field: str) -> dict[str, ParameterValue]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{field} must be an object", field)
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise InvalidRequest(f"{field}.{key} must be a boolean, number or string", f"{field}.{key}")
    return value


def _decode_inputs(inputs: Any, binary: bytes) -> dict[str, Tensor]:
    if not isinstance(inputs, list):
        raise InvalidRequest("inputs must be a list of tensors", "inputs")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for obj in inputs:
        size = obj.get("parameters", {}).get("binary_data_size") if isinstance(obj, dict) else None
        chunk = None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidRequest(f"binary_data_size {size!r} runs past the binary data", "inputs")
            chunk, offset = binary[offset:offset + size], offset + size
        tensor = decode_json_input(obj, chunk)
        if tensor.name in tensors:
            raise InvalidRequest(f"input '{tensor.name}' appears more than once", tensor.name)
        tensors[tensor.name] = tensor
    return tensors


def _generate_tensor(name: str, value: Any) -> Tensor:
    """A generate-extension JSON value as the model's declared input (a list: several elements)."""
    spec = INPUTS_BY_NAME.get(name)
    if spec is None:
        raise InvalidRequest(f"unexpected inference input '{name}'", name)
    values = value if isinstance(value, list) else [value]
    converted: list[Any] = []
    for item in values:
        if spec.datatype == "BYTES" and isinstance(item, str):
            converted.append(item.encode("utf-8"))
        elif spec.datatype == "BOOL" and isinstance(item, bool):
            converted.append(item)
        elif spec.datatype in INTEGER_DATATYPES and isinstance(item, int) and not isinstance(item, bool):
            converted.append(item)
        elif spec.datatype in FLOAT_DATATYPES and isinstance(item, int | float) and not isinstance(item, bool):
            converted.append(float(item))
        else:
            raise InvalidRequest(f"input '{name}' must be {_DESCRIBE[spec.datatype]}, got {item!r}", name)
    return Tensor(name, spec.datatype, [len(converted)], converted)


_DESCRIBE = {"BYTES": "a string", "BOOL": "a boolean", **{t: "an integer" for t in INTEGER_DATATYPES},
             **{t: "a number" for t in FLOAT_DATATYPES}}


def add_kserve_routes(app: web.Application, pipeline: Pipeline, ready: ReadyCheck | None = None) -> KServeHttp:
    """Add the /v2 routes to the frontend's aiohttp app (before it starts)."""
    handlers = KServeHttp(KServeFrontend(pipeline, ready))
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/v2", handlers.server_metadata),
        ("GET", "/v2/health/live", handlers.live),
        ("GET", "/v2/health/ready", handlers.ready),
        ("POST", "/v2/repository/index", handlers.repository_index),
    ]
    for prefix in (_MODEL, _VERSIONED):
        routes += [
            ("GET", prefix, handlers.model_metadata),
            ("GET", f"{prefix}/ready", handlers.model_ready),
            ("GET", f"{prefix}/config", handlers.model_config),
            ("POST", f"{prefix}/infer", handlers.infer),
            ("POST", f"{prefix}/generate", handlers.generate),
            ("POST", f"{prefix}/generate_stream", handlers.generate_stream),
        ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return handlers
