"""The Python runtime under every service: process and garbage-collector metrics, and the collector's
start-up freeze.

A decode worker tracks about 370,000 Python objects once its model is loaded (torch, transformers,
gRPC, protobuf). A full collection walks all of them: 170 ms on a 2-core VM, holding the interpreter
lock, so the engine's step thread stops for that long and every stream in the batch sees a 170 ms
gap between two tokens. Nearly all of those objects live as long as the process, so once a service
has started they are moved out of the collector's sight (``freeze_startup_objects``): a full
collection then walks only what was made since.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# Young collections take tens of microseconds; a full one over a loaded model's objects 100-200 ms.
_PAUSE_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _GcPauses:
    """Times every collection of this process (one ``gc.callbacks`` hook, however many registries show it)."""

    def __init__(self) -> None:
        self.histogram = Histogram(
            "tandem_gc_pause_seconds",
            "Time of each garbage collection of this process, by generation (2 is a full collection); "
            "the interpreter lock is held meanwhile, so every thread of the process waits.",
            ["generation"], buckets=_PAUSE_BUCKETS_S, registry=None)
        for generation in ("0", "1", "2"):
            self.histogram.labels(generation=generation)
        self._started: dict[int, float] = {}  # by thread: a collection runs in the thread that triggered it
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
            return
        started = self._started.pop(thread, None)
        if started is not None:
            self.histogram.labels(generation=str(info["generation"])).observe(time.perf_counter() - started)


class _GcCollector(Collector):
    def __init__(self, pauses: _GcPauses) -> None:
        self._pauses = pauses

    def collect(self) -> Iterator[Any]:
        yield from self._pauses.histogram.collect()
        yield GaugeMetricFamily("tandem_gc_frozen_objects",
                                "Objects moved out of the garbage collector's sight once the service started "
                                "(they live as long as the process; collections skip them).",
                                value=gc.get_freeze_count())


_pauses: _GcPauses | None = None
_pauses_lock = threading.Lock()


def register_runtime_metrics(registry: CollectorRegistry) -> None:
    """Add the standard ``process_*`` (CPU, memory, open files), ``python_info`` and ``python_gc_*``
    metrics that Prometheus users expect of a Python service, ``tandem_gc_pause_seconds`` and
    ``tandem_gc_frozen_objects``."""
    global _pauses
    with _pauses_lock:
        if _pauses is None:
            _pauses = _GcPauses()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(_GcCollector(_pauses))


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now into the permanent generation, which later
    collections skip. Call when a service has finished starting; returns how many objects moved."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
