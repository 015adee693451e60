"""Decode steps with the weights in transparent huge pages against the safetensors file's own pages.

Starts two engine processes on the CPU (default model, fp32): one as the engine now loads (weights
moved into one huge-page mapping), one with that move turned off (weights left in the file's 4 KiB
page-cache pages, as transformers maps them). They take turns, a run each, alternating who goes
first; a run is two waves of ``batch`` greedy requests. Prints the median decode step of each and
the median of the per-pair ratios (huge / file).
Usage: python benchmarks/weight_pages.py [--batch 1 4 16] [--runs 8] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from _stats import median, table  # noqa: E402

PLACEMENTS = ("file", "huge")


async def child(placement: str, model: str | None, threads: int) -> None:
    """Serve runs over stdin/stdout: a line {"batch": B, "max_tokens": N} in, the mean decode step (s) out."""
    import torch

    import tandem.engine.hf.model_runner as model_runner
    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.engine import HFEngine
    from tandem.engine.types import EngineRequest, SamplingParams, StepInfo
    from tandem.models import resolve_model

    if placement == "file":
        model_runner._weights_to_huge_pages = lambda model: 0  # noqa: SLF001 (the comparison's baseline)
    torch.set_num_threads(threads)
    steps: list[StepInfo] = []
    engine = HFEngine(EngineConfig(model_path=Path(model) if model else resolve_model(None), num_threads=threads),
                      on_step=steps.append)
    await engine.start()
    loop = asyncio.get_running_loop()
    out = sys.__stdout__
    assert out is not None
    print("ready", file=out, flush=True)
    run = 0
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        ask = json.loads(line)
        run += 1
        steps.clear()
        sampling = SamplingParams(max_tokens=ask["max_tokens"], temperature=0.0, ignore_eos=True)
        for wave in range(2):
            requests = [EngineRequest(f"r{run}-{wave}-{i}", engine.tokenizer(
                f"Tell me a long story about lighthouse number {i}, wave {wave} of run {run}.")["input_ids"], sampling)
                for i in range(ask["batch"])]
            await asyncio.gather(*(drain(engine.generate(request)) for request in requests))
        decode = [s.duration_s for s in steps if s.num_prefill_tokens == 0 and s.num_seqs == ask["batch"]]
        print(json.dumps({"step_s": sum(decode) / len(decode)}), file=out, flush=True)
    await engine.shutdown()


async def drain(outputs: AsyncIterator[object]) -> None:
    async for _ in outputs:
        pass


def read_reply(proc: subprocess.Popen[str]) -> str:
    """The child's next protocol line (its logs may share stdout)."""
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(("ready", "{")):
            return line
    raise SystemExit(f"an engine process exited ({proc.wait()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M)")
    parser.add_argument("--child", choices=PLACEMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.model, args.threads))
        return

    command = [sys.executable, __file__, "--threads", str(args.threads), *(["--model", args.model] if args.model else [])]
    procs = {p: subprocess.Popen([*command, "--child", p], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True) for p in PLACEMENTS}
    try:
        for proc in procs.values():
            read_reply(proc)
        rows = []
        for batch in args.batch:
            steps: dict[str, list[float]] = {p: [] for p in PLACEMENTS}
            for i in range(args.runs):
                for placement in PLACEMENTS if i % 2 == 0 else PLACEMENTS[::-1]:
                    proc = procs[placement]
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps({"batch": batch, "max_tokens": args.max_tokens}) + "\n")
                    proc.stdin.flush()
                    steps[placement].append(json.loads(read_reply(proc))["step_s"])
            ratios = [h / f for f, h in zip(steps["file"], steps["huge"], strict=True)]
            rows.append([batch, args.runs, median(steps["file"]) * 1e3, median(steps["huge"]) * 1e3, median(ratios),
                         f"{min(ratios):.3f}-{max(ratios):.3f}"])
        print(table(["batch", "pairs", "file pages step ms", "huge pages step ms", "huge/file", "pair spread"], rows))
    finally:
        for proc in procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in procs.values():
            proc.wait(60)


if __name__ == "__main__":
    main()
