"""The load benchmark's runs and its report: the figures of a run, the mesh/engine ratios of paired
runs, the verdict against the 5% target, and runs saved to a file and pooled across invocations
(``benchmarks/load.py --save`` / ``--pool``)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _stats import median, median_ci, paired_ratio_ci, percentile, table

# What must match for runs of two invocations to be pooled (besides the concurrency).
SETTING_KEYS = ("device", "model", "chat", "max_tokens", "requests_per_level", "client")


@dataclass
class RunResult:
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    requests: int = 0
    wall_s: float = 0.0
    step_s: float = 0.0  # forward passes of the engine (in-process) or the worker (mesh) during the run
    steps: int = 0

    def note_token(self, start: float, last: float | None) -> float:
        """A token's text arrived now: its TTFT (first) or its gap since ``last``. Returns now."""
        now = time.perf_counter()
        if last is None:
            self.ttft_s.append(now - start)
        else:
            self.itl_s.append(now - last)
        return now


def figures(run: RunResult) -> dict[str, float]:
    return {
        "req/s": run.requests / run.wall_s,
        "tok/s": run.output_tokens / run.wall_s,
        "ttft_p50_ms": percentile(run.ttft_s, 50) * 1e3,
        "ttft_p99_ms": percentile(run.ttft_s, 99) * 1e3,
        "itl_p50_ms": percentile(run.itl_s, 50) * 1e3,
        "itl_p99_ms": percentile(run.itl_s, 99) * 1e3,
        "step_ms": run.step_s / run.steps * 1e3 if run.steps else float("nan"),
    }


def summarize(runs: list[RunResult]) -> dict[str, float]:
    per_run = [figures(r) for r in runs]
    return {key: median([f[key] for f in per_run]) for key in per_run[0]}


def paired_ratios(mesh_runs: list[RunResult], engine_runs: list[RunResult]) -> dict[str, list[float]]:
    """Each figure's mesh/engine ratio, per adjacent pair of runs."""
    pairs = [(figures(m), figures(e)) for m, e in zip(mesh_runs, engine_runs, strict=True)]
    return {key: [m[key] / e[key] for m, e in pairs] for key in pairs[0][0]}


def against_target(ratio: float, low: float, high: float, target: float = 1.05) -> str:
    """A ratio, its confidence interval and where that interval sits against the mesh's cost target."""
    if high != high:  # NaN: a single pair has no interval
        return f"{ratio:.3f} (one pair: no interval; use --runs 2 or more)"
    where = ("inside the target" if high < target else "over the target" if low > target
             else "not told apart from the target")
    return f"{ratio:.3f} (CI95 {low:.3f}-{high:.3f}: {where})"


def print_report(rows: list[list[object]], verdicts: list[str]) -> None:
    print(table(["conc", "path", "req/s", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                 "step ms", "TTFT ratio spread", "TTFT ratio CI95", "ITL ratio CI95"], rows))
    print("\nAgainst the target (the mesh adds under 5% to TTFT p50 and ITL p50). Pair ratio: the median of the "
          "pairs' ratios; pooled: the mesh's p50 over the engine's, each over every request of every run (its "
          "CI95 resamples pairs). Inside: the whole CI95 under 1.05.")
    for line in verdicts:
        print(f"  {line}")


def report_level(concurrency: int, mesh_runs: list[RunResult],
                 engine_runs: list[RunResult]) -> tuple[list[list[object]], str]:
    """A level's three table rows (engine, mesh, mesh/engine) and its line against the target."""
    rows: list[list[object]] = []
    e, m = summarize(engine_runs), summarize(mesh_runs)
    for name, summary in (("engine", e), ("mesh", m)):
        rows.append([concurrency, name, *(summary[k] for k in summary), "", "", ""])
    ratios = paired_ratios(mesh_runs, engine_runs)
    spread = f"{min(ratios['ttft_p50_ms']):.3f}-{max(ratios['ttft_p50_ms']):.3f}"
    cis = {key: median_ci(ratios[key]) for key in ("ttft_p50_ms", "itl_p50_ms")}
    rows.append([concurrency, "mesh/engine", *(median(r) for r in ratios.values()), spread,
                 *(f"{low:.3f}-{high:.3f}" for low, high in cis.values())])
    parts = []
    for label, key, samples in (("TTFT p50", "ttft_p50_ms", "ttft_s"), ("ITL p50", "itl_p50_ms", "itl_s")):
        pooled, low, high = paired_ratio_ci([(getattr(mr, samples), getattr(er, samples))
                                             for mr, er in zip(mesh_runs, engine_runs, strict=True)])
        parts.append(f"{label}: pair ratio {against_target(median(ratios[key]), *cis[key])}, "
                     f"pooled {against_target(pooled, low, high)}")
    return rows, f"concurrency {concurrency} ({len(mesh_runs)} pairs): " + "; ".join(parts)


def save_level(path: Path, setting: dict[str, object], concurrency: int, mesh_runs: list[RunResult],
               engine_runs: list[RunResult]) -> None:
    """Append a level's runs to ``path`` (one JSON line), for --pool to report with other invocations'."""
    record = {**setting, "concurrency": concurrency, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "pairs": [{"mesh": dataclasses.asdict(mr), "engine": dataclasses.asdict(er)}
                        for mr, er in zip(mesh_runs, engine_runs, strict=True)]}
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")


def pool(paths: list[Path]) -> None:
    """Report the pairs saved by --save across invocations, level by level (same setting only)."""
    levels: dict[tuple[tuple[object, ...], int], list[dict[str, Any]]] = {}  # by (setting, concurrency)
    for path in paths:
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        for line in text.splitlines():
            record = json.loads(line)
            key = (tuple(record[k] for k in SETTING_KEYS), int(record["concurrency"]))
            levels.setdefault(key, []).append(record)
    rows: list[list[object]] = []
    verdicts: list[str] = []
    for (values, concurrency), records in sorted(levels.items(), key=lambda item: (str(item[0][0]), item[0][1])):
        pairs = [pair for record in records for pair in record["pairs"]]
        mesh_runs = [RunResult(**pair["mesh"]) for pair in pairs]
        engine_runs = [RunResult(**pair["engine"]) for pair in pairs]
        level_rows, verdict = report_level(concurrency, mesh_runs, engine_runs)
        rows += level_rows
        setting = ", ".join(f"{k} {v}" for k, v in zip(SETTING_KEYS, values, strict=True))
        verdicts.append(f"{verdict} [{len(records)} invocation(s): {setting}]")
    print(f"\npooled from {', '.join(str(p) for p in paths)}\n")
    print_report(rows, verdicts)
