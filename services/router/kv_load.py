"""Per-worker load as the KV router predicts it: prefill tokens queued and KV blocks in use.

Predicted at routing time, moved at the first token, released at finish, and corrected by the
workers' load reports for load the router never saw (other routers, lost feedback).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Request:
    worker_id: str
    routed_s: float
    prefill_tokens: int  # uncached prompt tokens, until the first token
    block_hashes: tuple[int, ...]  # the prompt's full blocks, shared with other requests by hash
    num_private_blocks: int  # the partial last block (and output) that no other request shares


@dataclass(slots=True)
class _WorkerLoad:
    prefill_tokens: int = 0
    # Active requests' shared (prefix) blocks, by hash, with the number of requests holding each.
    block_refs: dict[int, int] = field(default_factory=dict)
    num_private_blocks: int = 0
    num_request_blocks: int = 0  # every active request's blocks, shared ones once per request
    # From the last load report: blocks in use beyond what the router predicted.
    num_untracked_blocks: int = 0


class LoadTracker:
    """Active prefill tokens and decode blocks per worker, from the router's own decisions.

    With ``share_blocks`` (the default, as Dynamo's router counts) a block that several active
    requests hold counts once, as it does in the worker's memory: requests sharing a hot system
    prompt add only their own blocks, so the worker holding it takes many of them before a cold
    prefill elsewhere looks cheaper. Without it each request counts its whole context (the
    attention each decode step computes), which spreads a hot prefix after one or two requests.

    Feedback may be lost (a frontend dies mid-request), so a request that reports no first
    token within ``prefill_timeout_s`` is assumed to be decoding, and one that reports no finish
    within ``request_ttl_s`` is assumed done. Single-threaded: the router's event loop only.
    """

    def __init__(self, prefill_timeout_s: float = 60.0, request_ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, *, share_blocks: bool = True) -> None:
        if not 0 < prefill_timeout_s <= request_ttl_s:
            raise ValueError("invalid router setting prefill_timeout_s: must be > 0 and <= request_ttl_s, "
                             f"got {prefill_timeout_s} (request_ttl_s={request_ttl_s})")
        self._prefill_timeout_s = prefill_timeout_s
        self._request_ttl_s = request_ttl_s
        self._clock = clock
        self.share_blocks = share_blocks
        self._workers: dict[str, _WorkerLoad] = {}
        # Both in routing order, so expiry pops from the front instead of scanning everything.
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._prefilling: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._requests)

    # -- reads ---------------------------------------------------------------------------------

    def prefill_tokens(self, worker_id: str) -> int:
        load = self._workers.get(worker_id)
        return load.prefill_tokens if load else 0

    def decode_blocks(self, worker_id: str) -> int:
        load = self._workers.get(worker_id)
        return self._tracked_blocks(load) + load.num_untracked_blocks if load else 0

    def _tracked_blocks(self, load: _WorkerLoad) -> int:
        if self.share_blocks:
            return len(load.block_refs) + load.num_private_blocks
        return load.num_request_blocks

    def num_active_leading(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """How many leading ``block_hashes`` active requests on the worker already hold (0 unless
        ``share_blocks``: only then does holding them make a request cheaper).

        A binary search: tracked hashes are whole chains from a prompt's first block, and a
        chained hash implies every block before it, so the held ones form a leading run.
        """
        load = self._workers.get(worker_id)
        if load is None or not load.block_refs or not self.share_blocks:
            return 0
        refs = load.block_refs
        low, high = 0, len(block_hashes)
        while low < high:
            middle = (low + high) // 2
            if block_hashes[middle] in refs:
                low = middle + 1
            else:
                high = middle
        return low

    def num_active(self, worker_id: str) -> int:
        return sum(1 for request in self._requests.values() if request.worker_id == worker_id)

    # -- the request lifecycle -----------------------------------------------------------------

    def on_routed(self, request_id: str, worker_id: str, prefill_tokens: int,
                  block_hashes: Sequence[int], num_private_blocks: int = 1) -> None:
        """Count a request just sent to ``worker_id``. A re-routed request moves its load."""
        if request_id in self._requests:
            self.on_finished(request_id)
        request = _Request(worker_id, self._clock(), max(0, prefill_tokens), tuple(block_hashes),
                           num_private_blocks)
        load = self._workers.setdefault(worker_id, _WorkerLoad())
        load.prefill_tokens += request.prefill_tokens
        refs = load.block_refs
        for block_hash in request.block_hashes:
            refs[block_hash] = refs.get(block_hash, 0) + 1
        load.num_private_blocks += num_private_blocks
        load.num_request_blocks += len(request.block_hashes) + num_private_blocks
        self._requests[request_id] = request
        if request.prefill_tokens:
            self._prefilling[request_id] = None

    def on_first_token(self, request_id: str, worker_id: str | None = None) -> None:
        """Its prefill is done: the tokens leave the prefill queue; its blocks stay until finish.

        With ``worker_id``, a notice from another worker than the request's (it was re-routed
        since) is ignored.
        """
        request = self._requests.get(request_id)
        if request is None or (worker_id is not None and request.worker_id != worker_id):
            return
        self._prefilling.pop(request_id, None)
        if not request.prefill_tokens:
            return
        load = self._workers.get(request.worker_id)
        if load is not None:
            load.prefill_tokens -= request.prefill_tokens
        request.prefill_tokens = 0

    def on_finished(self, request_id: str, worker_id: str | None = None) -> None:
        """Release everything the request held. Unknown ids (expired, never routed) are ignored, and
        so, with ``worker_id``, is the end of an earlier attempt on another worker."""
        request = self._requests.get(request_id)
        if request is None or (worker_id is not None and request.worker_id != worker_id):
            return
        self.on_first_token(request_id)
        del self._requests[request_id]
        load = self._workers.get(request.worker_id)
        if load is None:
            return
        refs = load.block_refs
        for block_hash in request.block_hashes:
            count = refs[block_hash] - 1
            if count:
                refs[block_hash] = count
            else:
                del refs[block_hash]
        load.num_private_blocks -= request.num_private_blocks
        load.num_request_blocks -= len(request.block_hashes) + request.num_private_blocks

    # -- corrections ---------------------------------------------------------------------------

    def on_load_report(self, worker_id: str, num_kv_blocks_used: int) -> None:
        """Reconcile with what the worker says it uses.

        Only an excess is kept: a report lower than the prediction is mostly requests routed
        a moment ago that the worker has not admitted yet, which must stay counted.
        """
        load = self._workers.setdefault(worker_id, _WorkerLoad())
        load.num_untracked_blocks = max(0, num_kv_blocks_used - self._tracked_blocks(load))

    def remove_worker(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        for request_id in [rid for rid, request in self._requests.items() if request.worker_id == worker_id]:
            del self._requests[request_id]
            self._prefilling.pop(request_id, None)

    def expire(self) -> int:
        """Apply the timeouts for feedback that never came; returns the requests released."""
        now = self._clock()
        while self._prefilling:
            request_id = next(iter(self._prefilling))
            request = self._requests.get(request_id)
            if request is not None and now - request.routed_s < self._prefill_timeout_s:
                break
            self._prefilling.pop(request_id)
            self.on_first_token(request_id)
        num_released = 0
        while self._requests:
            request_id, request = next(iter(self._requests.items()))
            if now - request.routed_s < self._request_ttl_s:
                break
            self.on_finished(request_id)
            num_released += 1
        return num_released
