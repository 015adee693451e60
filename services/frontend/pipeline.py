"""The request pipeline every frontend API shares: model check, tokenisation, validation, then
route via the router and stream the tokens straight from the chosen decode worker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from prometheus_client import CollectorRegistry

from services.frontend.admission import WORKERS_FULL, Admission
from services.frontend.failure_detection import FailoverMetrics, FailureReporter, WorkerStreamBroken
from services.frontend.messages import normalise_messages
from services.frontend.metrics import STATUS_CANCELLED, STATUS_SUCCESS, FrontendMetrics
from services.frontend.migration import StreamProgress
from services.frontend.route_client import RouteClient, SoleWorker
from services.frontend.worker_client import WorkerClient, request_metadata
from tandem.engine.types import FinishReason, RequestOutput, SamplingParams
from tandem.errors import InvalidRequest, NotFound, ResourceExhausted, TandemError, Unavailable
from tandem.grpc_server import CHANNEL_OPTIONS
from tandem.kv.hashing import hash_blocks
from tandem.proto.router.v1 import router_pb2, router_pb2_grpc

log = structlog.get_logger(__name__)

KV_BLOCK_SIZE = 16  # the workers' default; the router re-hashes for workers with another size


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    endpoint: str  # metrics label, e.g. "chat_completions", "completions", "native_generate"
    streaming: bool  # metrics label request_type = "stream" | "unary"
    routing: router_pb2.RoutingOverrides | None = None  # the body's "routing" (extra_body)
    # Set on a moved request: the last this many prompt tokens are its earlier output (penalties).
    num_resumed_output_tokens: int = 0


class Pipeline:
    """Shared by the OpenAI HTTP, native gRPC and KServe APIs; one per frontend process.

    The synchronous helpers (check_model, tokenize, apply_chat_template, validate_prompt)
    raise tandem.errors with the request field at fault; ``generate`` streams the outputs and
    trusts that the caller ran validate_prompt first.
    """

    def __init__(
        self,
        *,
        model_name: str,
        max_model_len: int,
        tokenizer: Any,
        router_address: str,
        metrics: FrontendMetrics | None = None,
        request_timeout_s: float | None = None,
        route_timeout_s: float = 5.0,
        max_reroutes: int = 2,
        migration_limit: int = 3,
        stall_timeout_s: float | None = None,
        first_token_timeout_s: float | None = None,
        # A stream silent past its limit moves only if its worker does not answer a health check this
        # fast: a live process answers in milliseconds even when its engine is slow.
        stall_confirm_timeout_s: float = 1.0,
        max_inflight_requests: int = 1024,
        max_queued_requests: int = 1024,
        queue_timeout_s: float = 30.0,
        predict_routes: bool = True,
        worker_streams: bool = True,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.router_address = router_address
        self.metrics = metrics if metrics is not None else FrontendMetrics(CollectorRegistry())
        self.request_timeout_s = request_timeout_s
        self.route_timeout_s = route_timeout_s
        self.max_reroutes = max_reroutes  # failures before any token
        self.migration_limit = migration_limit  # failures after tokens were streamed
        self.failover_metrics = FailoverMetrics(self.metrics.registry)
        self._admission = Admission(
            max_inflight_requests, max_queued_requests, queue_timeout_s,
            on_reject=lambda reason: self.failover_metrics.rejected_overload.labels(model_name, reason).inc(),
            on_queue_change=self.failover_metrics.queued.set,
        )
        self._router_channel = grpc.aio.insecure_channel(router_address, options=CHANNEL_OPTIONS)
        self._router = router_pb2_grpc.RouterServiceStub(self._router_channel)
        self._routes = RouteClient(self._router, router_address)
        # The router's only worker for this model, when it said so: requests start there without waiting.
        self._sole_worker = SoleWorker() if predict_routes else None
        self._reporter = FailureReporter(self._router)
        self._workers = WorkerClient(self.failover_metrics, request_timeout_s=request_timeout_s,
                                     stall_timeout_s=stall_timeout_s, first_token_timeout_s=first_token_timeout_s,
                                     stall_confirm_timeout_s=stall_confirm_timeout_s, worker_streams=worker_streams)

    @classmethod
    async def from_model_dir(cls, model_path: Path, *, model_name: str, max_model_len: int | None = None,
                             **kwargs: Any) -> Pipeline:
        """Load the tokenizer off the event loop (~1 s), then build the pipeline on it."""
        tokenizer, model_max_len = await asyncio.to_thread(_load_tokenizer, model_path)
        return cls(model_name=model_name, max_model_len=max_model_len or model_max_len, tokenizer=tokenizer,
                   **kwargs)

    async def close(self) -> None:
        if self._sole_worker is not None:
            await self._sole_worker.close()
        await self._workers.close()
        await self._routes.close()
        await self._reporter.close()
        await self._router_channel.close()

    # -- request preparation ---------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise NotFound(f"The model '{model}' does not exist; this server serves '{self.model_name}'", "model")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if add_special_tokens:  # what every generation request does: the tokenizer's plain encode
            return list(self.tokenizer.encode(text))
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        normalised = normalise_messages(messages)
        try:
            token_ids = self.tokenizer.apply_chat_template(
                normalised, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        except Exception as exc:  # the template is model code: any failure means bad messages
            raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", "messages") from exc
        return list(token_ids)

    def validate_prompt(self, token_ids: list[int], sampling: SamplingParams, field: str = "prompt") -> None:
        if not token_ids:
            raise InvalidRequest(f"{field} is empty: there must be at least one prompt token", field)
        num_needed = len(token_ids) + (sampling.max_tokens or 1)
        if num_needed > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens, but the request "
                f"needs {num_needed} ({len(token_ids)} in the {field}, {sampling.max_tokens or 1} for the "
                "completion). Shorten the prompt or lower max_tokens.",
                field,
            )
        self.validate_token_ids(token_ids, field)

    def validate_token_ids(self, token_ids: list[int], field: str) -> None:
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})", field)

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs; the last has finish_reason set.

        Raises Unavailable (no healthy worker, or the request could not migrate), InvalidRequest or
        ResourceExhausted (the frontend's queue or every worker is full) - before the first output or,
        when a failed worker's request cannot move elsewhere, mid-stream.
        Closing the iterator (use contextlib.aclosing) or cancelling the task cancels the worker
        call, which aborts the request there and frees its KV blocks.
        """
        tracker = self.metrics.track(self.model_name, request.endpoint,
                                     "stream" if request.streaming else "unary", len(request.prompt_token_ids))
        status = STATUS_CANCELLED
        try:
            async with self._admission.slot(), aclosing(self._generate_migrating(request)) as outputs:
                async for output in outputs:
                    tracker.on_tokens(len(output.token_ids))
                    if output.finished:
                        status = STATUS_SUCCESS
                    yield output
        except TandemError as exc:
            status = exc.code
            raise
        except Exception:
            status = "internal"
            log.exception("generate failed", request_id=request.request_id)
            raise
        finally:  # also on GeneratorExit / CancelledError, which leave status "cancelled"
            tracker.finish(status)

    async def _generate_migrating(self, request: GenerationRequest) -> AsyncGenerator[RequestOutput, None]:
        """Route, stream, and on a worker failure resubmit what is left to another worker."""
        progress = StreamProgress(list(request.prompt_token_ids), request.sampling, self.max_model_len)
        excluded_worker_ids: list[str] = []
        num_reroutes = 0
        worker_full: ResourceExhausted | None = None  # a refusal for capacity: "no worker left" means overload
        while True:
            attempt = request
            if progress.num_output_tokens:
                attempt = dataclasses.replace(request, prompt_token_ids=progress.worker_prompt(),
                                              sampling=progress.worker_sampling(),
                                              num_resumed_output_tokens=progress.num_output_tokens)
            try:
                route = self._predicted_route(attempt, excluded_worker_ids) or await self._asked_route(
                    attempt, excluded_worker_ids)
            except Unavailable as exc:
                if worker_full is not None:
                    self.failover_metrics.rejected_overload.labels(self.model_name, WORKERS_FULL).inc()
                    raise worker_full from None
                if progress.num_migrations:
                    self.failover_metrics.migration_failures.labels(self.model_name).inc()
                    raise Unavailable(f"the request's worker failed after {progress.num_output_tokens} tokens and "
                                      f"no other worker can continue it: {exc.message}") from None
                raise
            try:
                async with aclosing(self._workers.stream(attempt, route)) as outputs:
                    async for worker_output in outputs:
                        output = progress.accept(worker_output)
                        if output is not None:
                            yield output
                            if output.finished:
                                return
                return
            except ResourceExhausted as exc:
                if progress.num_output_tokens or num_reroutes >= self.max_reroutes:
                    raise
                num_reroutes += 1
                worker_full = exc
                excluded_worker_ids.append(route.worker_id)
                continue
            except WorkerStreamBroken as exc:
                self._on_worker_failure(request, route, exc)
                excluded_worker_ids.append(route.worker_id)
                if not progress.num_output_tokens:
                    if num_reroutes >= self.max_reroutes:
                        raise Unavailable(f"worker {route.worker_id} failed: {exc}") from None
                    num_reroutes += 1
                elif progress.num_migrations >= self.migration_limit:
                    self.failover_metrics.migration_failures.labels(self.model_name).inc()
                    raise Unavailable(f"worker {route.worker_id} failed after {progress.num_output_tokens} tokens "
                                      f"and the migration limit ({self.migration_limit}) is reached: {exc}") from None
                progress.start_migration(self.tokenizer)
                self.failover_metrics.migrations.labels(self.model_name, exc.kind).inc()
                log.warning("worker failed; migrating the request", worker_id=route.worker_id, kind=exc.kind,
                            error=str(exc), num_output_tokens=progress.num_output_tokens,
                            migration=progress.num_migrations, request_id=request.request_id)
                finish_reason = progress.finished_without_worker()
                if finish_reason is not None:
                    yield progress.final_output(request.request_id, finish_reason)
                    return

    def _predicted_route(self, request: GenerationRequest,
                         excluded_worker_ids: list[str]) -> router_pb2.RouteResponse | None:
        """The model's only worker, when the router said there is one and nothing in the request could
        make it choose another (no overrides, exclusions or resumed output); its Route goes on meanwhile."""
        sole = self._sole_worker
        if (sole is None or sole.route is None or excluded_worker_ids or request.routing is not None
                or request.num_resumed_output_tokens):
            return None
        route = sole.route
        # The check runs later (after the burst it may belong to): it gets its own (empty) exclusions,
        # not the list a failure of this request will add to meanwhile.
        sole.check(self._route(request, []), self._count_misprediction)
        self.metrics.routes.labels(self.model_name, "predicted").inc()
        return route

    def _count_misprediction(self) -> None:
        self.metrics.route_mispredictions.labels(self.model_name).inc()

    async def _asked_route(self, request: GenerationRequest,
                           excluded_worker_ids: list[str]) -> router_pb2.RouteResponse:
        epoch = self._sole_worker.epoch if self._sole_worker is not None else 0
        route = await self._route(request, excluded_worker_ids)
        self.metrics.routes.labels(self.model_name, "asked").inc()
        if self._sole_worker is not None:
            self._sole_worker.learn(route, epoch)
        return route

    def _on_worker_failure(self, request: GenerationRequest, route: router_pb2.RouteResponse,
                           exc: WorkerStreamBroken) -> None:
        if self._sole_worker is not None:
            self._sole_worker.drop()
        self.failover_metrics.detection.labels(exc.kind).observe(exc.detected_after_s)
        self._reporter.report(route.worker_id, route.address, exc.kind, exc.detected_after_s, str(exc))

    async def _route(self, request: GenerationRequest, excluded_worker_ids: list[str]) -> router_pb2.RouteResponse:
        message = router_pb2.RouteRequest(
            request_id=request.request_id, model=self.model_name,
            token_ids=request.prompt_token_ids, exclude_worker_ids=excluded_worker_ids,
            overrides=request.routing,
            # Hashed here, not in the router: frontends scale out, the router's one loop does not.
            block_hashes=hash_blocks(request.prompt_token_ids, KV_BLOCK_SIZE), block_size=KV_BLOCK_SIZE,
        )
        try:
            return await self._routes.route(message, request_metadata(request.request_id), self.route_timeout_s)
        except Unavailable as exc:
            raise Unavailable(f"no healthy worker for model '{self.model_name}' ({exc.message})") from None

    async def num_healthy_workers(self) -> int:
        """Workers the router would route this model to; 0 when the router cannot be reached."""
        try:
            response = await self._router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=self.route_timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("router unreachable", address=self.router_address, code=exc.code().name)
            return 0
        return sum(
            1 for worker in response.workers
            if worker.healthy and worker.info.role != router_pb2.WORKER_ROLE_PREFILL
            and (not worker.info.model or worker.info.model == self.model_name)
        )


def is_valid_request_id(value: str) -> bool:
    """Request ids travel as gRPC metadata, which takes printable ASCII only."""
    return 0 < len(value) <= 128 and all(33 <= ord(c) <= 126 for c in value)


def _load_tokenizer(model_path: Path) -> tuple[Any, int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    config = json.loads((model_path / "config.json").read_text())
    return tokenizer, int(config.get("max_position_embeddings") or 2048)


__all__ = ["FinishReason", "GenerationRequest", "Pipeline", "RequestOutput"]
