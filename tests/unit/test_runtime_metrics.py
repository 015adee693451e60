"""Every service's /metrics carries the process and garbage-collector metrics, and a started service's
objects are frozen out of full collections (a full walk over a loaded model's objects stalls every
thread of the process for 100-200 ms)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tandem import lifecycle
from tandem.telemetry.runtime import freeze_startup_objects, register_runtime_metrics

pytestmark = pytest.mark.unit


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    page = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(page) for s in family.samples}


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as it was: nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_process_and_collector_metrics_on_every_registry_given() -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]  # two services in one process: both show them
    for registry in registries:
        register_runtime_metrics(registry)
    before = [samples(r)[("tandem_gc_pause_seconds_count", (("generation", "2"),))] for r in registries]
    gc.collect()
    for registry, count_before in zip(registries, before, strict=True):
        values = samples(registry)
        assert values[("process_resident_memory_bytes", ())] > 10e6
        assert values[("process_cpu_seconds_total", ())] > 0
        assert values[("process_open_fds", ())] > 0
        assert values[("python_gc_collections_total", (("generation", "2"),))] >= 1
        # One hook times each collection once, whichever registry shows it.
        assert values[("tandem_gc_pause_seconds_count", (("generation", "2"),))] == count_before + 1
        assert values[("tandem_gc_pause_seconds_sum", (("generation", "2"),))] > 0
        assert ("tandem_gc_frozen_objects", ()) in values


def test_freezing_moves_what_exists_out_of_collections(unfrozen: None) -> None:
    registry = CollectorRegistry()
    register_runtime_metrics(registry)
    kept = [[i] for i in range(10_000)]  # tracked containers made "at start-up"
    tracked_before = len(gc.get_objects())
    frozen = freeze_startup_objects()
    assert frozen >= len(kept)
    assert samples(registry)[("tandem_gc_frozen_objects", ())] == frozen
    # A full collection no longer walks them: it sees only what was made since.
    assert len(gc.get_objects()) < tracked_before - 10_000


def test_a_started_service_has_its_start_up_objects_frozen(unfrozen: None) -> None:
    frozen_at_stop: list[int] = []
    made_at_start: list[list[int]] = []

    class Service:
        async def stop(self) -> None:
            frozen_at_stop.append(gc.get_freeze_count())

    async def start() -> Service:
        made_at_start.extend([i] for i in range(5_000))
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return Service()

    assert lifecycle.run(lifecycle.serve_until_signal(start)) is True
    assert frozen_at_stop and frozen_at_stop[0] >= len(made_at_start) == 5_000
