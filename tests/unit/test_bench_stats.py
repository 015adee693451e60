"""The benchmark's statistics (benchmarks/_stats.py): what load.py's verdict lines rest on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_stats", Path(__file__).resolve().parents[2] / "benchmarks" / "_stats.py")
assert _spec is not None and _spec.loader is not None
stats = importlib.util.module_from_spec(_spec)
sys.modules["bench_stats"] = stats
_spec.loader.exec_module(stats)


def test_the_pooled_ratio_is_of_the_two_paths_percentiles_over_every_request() -> None:
    # Three pairs of runs; the mesh (first) is 4% slower on every request of every run.
    engine = [[100.0, 104.0], [90.0, 96.0], [110.0, 120.0]]
    pairs = [([x * 1.04 for x in e], e) for e in engine]
    ratio, low, high = stats.paired_ratio_ci(pairs)
    assert abs(ratio - 1.04) < 1e-9 and abs(low - 1.04) < 1e-9 and abs(high - 1.04) < 1e-9


def test_the_pooled_ratio_differs_from_the_median_pair_ratio_when_runs_differ() -> None:
    # A slow pair (both paths slow) counts in the pooled p50 but is one vote among pair ratios.
    pairs = [([101.0], [100.0]), ([102.0], [100.0]), ([150.0], [100.0]), ([300.0], [290.0])]
    ratio, low, high = stats.paired_ratio_ci(pairs, resamples=500)
    assert abs(ratio - stats.percentile([101.0, 102.0, 150.0, 300.0], 50) / 100.0) < 1e-9  # 126 / 100
    assert stats.median([m[0] / e[0] for m, e in pairs]) < ratio
    assert low <= ratio <= high


def test_one_pair_has_no_interval() -> None:
    ratio, low, high = stats.paired_ratio_ci([([2.0], [1.0])])
    assert ratio == 2.0 and low != low and high != high  # NaN bounds
    assert stats.median_ci([1.0])[0] != stats.median_ci([1.0])[0]
