"""The `Engine` protocol every engine (hf, vllm, sim) implements, shaped after vLLM's async engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tandem.engine.types import EngineRequest, EngineStats, RequestOutput


class Engine(Protocol):
    """An engine runs many requests in one continuous batch.

    Lifecycle: construct, ``await start()`` (loads weights; may take seconds), serve, then
    ``await shutdown()``. All methods are called from the event loop thread; an engine runs
    its forward passes elsewhere (a thread or a process) so the loop never blocks on them.
    """

    model_name: str
    max_model_len: int

    async def start(self) -> None:
        """Load the model and start the step loop. Called once, before any request."""

    def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Add a request to the batch and stream its outputs.

        The last item has ``finish_reason`` set. Raises ``InvalidRequest`` before the first
        item when the request cannot run (prompt too long, unknown token ids) and
        ``ResourceExhausted`` when the waiting queue is full. Closing the iterator early
        (``aclose()`` or cancellation) aborts the request and frees its KV blocks.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are released before the next step. Unknown ids are ignored."""

    def stats(self) -> EngineStats:
        """A cheap snapshot of queue and KV-cache figures; safe to call at any rate."""
        ...

    def healthy(self) -> bool:
        """False once the step loop has died; the worker then reports NOT_SERVING."""
        ...

    async def shutdown(self) -> None:
        """Abort what is running, stop the step loop and release the model."""
