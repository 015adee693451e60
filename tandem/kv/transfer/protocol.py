"""The interfaces of a KV transfer: the engines at either end and the transport between them.

A transport has two halves: an ``ChunkExporter`` on the prefill worker (turns pinned blocks into
chunks) and a ``KvPuller`` on the decode worker (fetches, verifies and writes them). gRPC and
shared memory implement both; a NIXL/UCX transport would too, without touching the services.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tandem.engine.types import (
    EngineRequest,
    EngineStats,
    KVLayout,
    KVReservation,
    PrefillResult,
    RequestOutput,
    TokenLogprob,
)
from tandem.kv.transfer.chunks import ChunkSpec
from tandem.kv.transfer.shared_pool import SharedPoolInfo


@dataclass(slots=True, frozen=True)
class TransferHandle:
    """Where a prefilled request's KV waits (the domain twin of ``kv.v1.KvHandle``)."""

    transfer_id: str
    address: str  # the prefill worker's host:port
    layout: KVLayout
    num_blocks: int
    num_tokens: int
    lease_ms: int
    host_id: str
    # The prefill worker's pool when it is in shared memory, and the handle's blocks in it.
    shared_pool: SharedPoolInfo | None = None
    block_ids: tuple[int, ...] = ()
    # time.monotonic() on this host before which the lease surely holds: the time Prefill was
    # sent plus the lease (the lease starts after that). None when unknown.
    lease_deadline_s: float | None = None
    # More addresses serving PullKv (gRPC) for this handle: the prefill worker's exporter processes.
    pull_addresses: tuple[str, ...] = ()


@dataclass(slots=True)
class PullResult:
    """What one pull moved, for metrics and the transfer's log line."""

    transport: str
    num_bytes: int = 0
    num_chunks: int = 0
    num_retried_chunks: int = 0
    duration_s: float = 0.0
    retry_reasons: list[str] = field(default_factory=list)

    @property
    def gigabytes_per_s(self) -> float:
        return self.num_bytes / self.duration_s / 1e9 if self.duration_s > 0 else 0.0


class KvTransferError(Exception):
    """A pull that could not complete (source gone, lease expired, retries or deadline spent)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # a metrics label: "unavailable", "not_found", "deadline", "corrupt", ...


class KvSource(Protocol):
    """The prefill side's engine as the exporter sees it (HFEngine fits)."""

    def kv_layout(self) -> KVLayout:
        """Shape of the pool; fixed after start()."""
        ...

    def read_kv(self, block_ids: list[int], layer_start: int, layer_count: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of pinned blocks, [layers, 2, blocks, block_size, kv_heads, head_dim], into ``out``
        when given (the shm exporter passes a view of its segment: one copy, no staging).

        Called from the event loop while the blocks are pinned; never blocks on the step thread.
        """
        ...


class KvSink(Protocol):
    """Where a puller writes verified chunks: the decode engine's reserved blocks."""

    def write(self, block_index: int, layer_start: int, data: torch.Tensor) -> None:
        """Copy ``data`` (a view of transport memory, valid only during the call) into the
        reserved blocks starting at the handle's ``block_index``. Called once per verified chunk."""

    def copy_from_pool(self, block_index: int, source_k: torch.Tensor, source_v: torch.Tensor,
                       source_block_ids: Sequence[int]) -> None:
        """Copy blocks ``source_block_ids`` of a peer's pool (K and V as [layers, slots, kv_heads,
        head_dim], a read-only shared mapping) into the reserved blocks from ``block_index`` on.

        Called on a copy thread, possibly on several at once for disjoint blocks."""

    def target_block_ids(self, block_index: int, count: int) -> Sequence[int] | None:
        """The blocks of this worker's own pool that receive handle blocks ``block_index`` on, when
        that pool is the one its pull helper processes map (they then write chunks straight into
        it); None otherwise, and the pull runs in this process."""


class PrefillEngine(KvSource, Protocol):
    """An engine in the prefill role."""

    model_name: str
    max_model_len: int

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def healthy(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        """Run the prompt and pin its blocks; the caller owns them until ``release_kv``."""
        ...

    async def release_kv(self, request_id: str) -> None:
        """Unpin a prefilled request's blocks. Called exactly once per pinned result."""


class ImportingEngine(Protocol):
    """An engine in the decode role that can continue requests prefilled elsewhere."""

    def kv_layout(self) -> KVLayout: ...

    async def reserve_kv(self, request: EngineRequest) -> KVReservation | None:
        """Hold blocks for the prompt (local prefix hits first); None when the pool is full."""
        ...

    async def cancel_reservation(self, reservation: KVReservation) -> None:
        """Free a reservation that ``generate_imported`` will not be given."""

    def write_kv(self, reservation: KVReservation, block_index: int, layer_start: int,
                 data: torch.Tensor) -> None: ...

    def import_kv_blocks(self, reservation: KVReservation, block_index: int, source_k: torch.Tensor,
                         source_v: torch.Tensor, source_block_ids: Sequence[int]) -> None:
        """``KvSink.copy_from_pool`` into the reservation: pool to pool, no staging."""

    def generate_imported(self, request: EngineRequest, reservation: KVReservation | None, first_token_id: int,
                          load_kv: Callable[[KVReservation], Awaitable[None]] | None,
                          first_token_logprob: TokenLogprob | None = None,
                          ) -> AsyncIterator[RequestOutput]:
        """Emit the first token, await ``load_kv`` (falling back to a local prefill if it
        raises), then decode. Closing the iterator frees the reservation."""
        ...


class ChunkExporter(Protocol):
    """The prefill worker's half of a transport: serves one PullKv call."""

    name: str

    def chunks(self, transfer_id: str, source: KvSource, block_ids: Sequence[int], plan: Sequence[ChunkSpec],
               *, skip_checksum: bool) -> AsyncIterator[bytes]:
        """Encoded ``KvChunk`` messages for ``plan``, in order. ``block_ids`` stay pinned for the
        whole iteration (the lease is marked busy). Resources it takes for ``transfer_id`` (a
        shared-memory segment) are kept for retries until ``release(transfer_id)``."""
        ...

    def release(self, transfer_id: str) -> None:
        """The transfer ended (ack, lease expiry, cancellation): free what it held. Idempotent."""

    def close(self) -> None:
        """Worker shutdown: free everything."""


class KvPuller(Protocol):
    """The decode worker's half of a transport: fetches one handle's blocks into a sink."""

    name: str

    async def pull(self, handle: TransferHandle, first_block: int, sink: KvSink, *,
                   timeout_s: float) -> PullResult:
        """Fetch blocks [first_block, handle.num_blocks) of every layer, verify each chunk, write
        it to ``sink``, re-requesting bad or missing chunks a bounded number of times.

        Called once per imported request, after Prefill answered and before ReleaseKv (which
        the caller sends, success or not). Raises ``KvTransferError``; cancellation stops it.
        """
        ...

    async def close(self) -> None:
        """Close channels and mappings. Called on worker shutdown."""
