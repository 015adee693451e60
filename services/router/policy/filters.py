"""Filters: which registered workers may serve a request at all."""

from __future__ import annotations

from collections.abc import Sequence

from services.router.policy.base import RouteContext
from services.router.registry import WorkerSnapshot


class ModelFilter:
    """Keeps workers serving the requested model; an empty model accepts any."""

    name = "model"

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        if not context.model:
            return list(workers)
        return [worker for worker in workers if worker.info.model == context.model]


class ExcludeFilter:
    """Drops workers the caller already failed on (migration retries elsewhere)."""

    name = "exclude"

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        return [worker for worker in workers if worker.worker_id not in context.exclude_worker_ids]


class RoleFilter:
    """Keeps workers of the role the request needs (decode, for now)."""

    name = "role"

    def filter(self, context: RouteContext, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        return [worker for worker in workers if worker.info.role is context.role]
