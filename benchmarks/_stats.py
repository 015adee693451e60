"""Small statistics helpers shared by the benchmark scripts."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no data."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000,
              seed: int = 0) -> tuple[float, float]:
    """A bootstrap (percentile) confidence interval of the median of ``values``: how far the median
    of this many paired ratios could land from run to run. Seeded, so a table reprints alike."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    data = list(values)
    medians = sorted(statistics.median(rng.choices(data, k=len(data))) for _ in range(resamples))
    tail = (1 - level) / 2 * 100
    return percentile(medians, tail), percentile(medians, 100 - tail)


def paired_ratio_ci(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], q: float = 50,
                    level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The ratio of two paths' pooled q-th percentiles, and a bootstrap interval of it that resamples
    whole pairs of runs (a pair's two runs share whatever the host was doing then).

    ``pairs`` holds, per pair of runs, (samples of path A, samples of path B); the ratio is A over B.
    Returns (ratio, low, high); NaN bounds for fewer than two pairs."""
    def ratio(chosen: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float:
        a = [x for pair in chosen for x in pair[0]]
        b = [x for pair in chosen for x in pair[1]]
        return percentile(a, q) / percentile(b, q)

    point = ratio(pairs)
    if len(pairs) < 2:
        return point, float("nan"), float("nan")
    rng = random.Random(seed)
    data = list(pairs)
    ratios = sorted(ratio(rng.choices(data, k=len(data))) for _ in range(resamples))
    tail = (1 - level) / 2 * 100
    return point, percentile(ratios, tail), percentile(ratios, 100 - tail)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
