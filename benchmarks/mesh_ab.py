"""Two meshes against each other and the in-process engine, in one invocation: what a setting costs.

Starts mesh A and mesh B (`tandem up`, one decode worker each), each with its own environment
(``--a "TANDEM_WORKER_STREAMS=0"``) and, optionally, its own source tree (``--b-dir`` a checkout of
another commit: the services run from it), and runs the same streamed requests through A, B and
the in-process engine in triples whose order rotates (the one that runs first in a triple tends to
come out ahead on a shared host). Prints each path's medians and the paired ratios A/engine,
B/engine and B/A of TTFT p50, ITL p50 and the worker's mean forward pass.
Usage: python benchmarks/mesh_ab.py --a "TANDEM_WORKER_STREAMS=0" --b "" [--concurrency 4] [--runs 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RunResult, figures  # noqa: E402
from _stats import median, table  # noqa: E402
from load import MeshClient, StepClock, prompts, run_engine, run_mesh, start_mesh  # noqa: E402

ORDERS = (("E", "A", "B"), ("B", "A", "E"), ("E", "B", "A"), ("A", "B", "E"))
KEYS = ("ttft_p50_ms", "itl_p50_ms", "step_ms")


@contextlib.contextmanager
def environment(settings: str, directory: str | None) -> Iterator[None]:
    """``settings`` (NAME=value ...) in the environment and ``directory`` as the working directory
    (``python -m`` imports the services from there) while a mesh starts."""
    saved_env, saved_dir = dict(os.environ), os.getcwd()
    for item in settings.split():
        name, _, value = item.partition("=")
        os.environ[name] = value
    if directory:
        os.chdir(directory)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_dir)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="", help="NAME=value settings of mesh A")
    parser.add_argument("--b", default="", help="NAME=value settings of mesh B")
    parser.add_argument("--a-dir", default=None, help="source tree mesh A runs from (default: this one)")
    parser.add_argument("--b-dir", default=None, help="source tree mesh B runs from (default: this one)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--runs", type=int, default=10, help="triples of runs")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: SmolLM2-135M)")
    parser.add_argument("--device", default="cpu", help="torch device of the workers and the in-process engine")
    args = parser.parse_args()

    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.engine import HFEngine
    from tandem.models import resolve_model, served_model_name

    torch.set_num_threads(1)
    model_path = args.model or resolve_model(None)
    model = served_model_name(model_path)
    meshes = {}
    for label, settings, directory in (("A", args.a, args.a_dir), ("B", args.b, args.b_dir)):
        with environment(settings, directory):
            meshes[label] = start_mesh(1, model_path, args.device)
    clock = StepClock()
    engine = HFEngine(EngineConfig(model_path=model_path, num_threads=1, device=args.device), on_step=clock)
    await engine.start()
    runs: dict[str, list[RunResult]] = {"E": [], "A": [], "B": []}
    clients = {who: MeshClient(url) for who, (_, url, _) in meshes.items()}  # kept across runs (keep-alive)
    try:
        texts = prompts(args.requests)
        await run_engine(engine, texts[:4], 4, 4)  # warm-up: first calls, caches
        for client in clients.values():  # and each client's connections, as many as the runs use at once
            await run_mesh(client, model, prompts(max(4, args.concurrency)), max(4, args.concurrency), 4, chat=True)
        for i in range(args.runs):
            for who in ORDERS[i % len(ORDERS)]:
                if who == "E":
                    runs[who].append(await run_engine(engine, texts, args.concurrency, args.max_tokens, clock, True))
                else:
                    runs[who].append(await run_mesh(clients[who], model, texts, args.concurrency, args.max_tokens,
                                                    meshes[who][2], True))
    finally:
        for client in clients.values():
            await client.close()
        await engine.shutdown()
        for proc, _, _ in meshes.values():
            proc.terminate()
            proc.wait(60)
    per_run = {who: [figures(run) for run in results] for who, results in runs.items()}
    rows = [[name, *(median([f[key] for f in per_run[who]]) for key in KEYS)]
            for who, name in (("E", "engine"), ("A", f"A {args.a or '(defaults)'}"), ("B", f"B {args.b or '(defaults)'}"))]
    for top, bottom in (("A", "E"), ("B", "E"), ("B", "A")):
        rows.append([f"{top}/{bottom}", *(median([t[key] / b[key] for t, b in zip(per_run[top], per_run[bottom],
                                                                                   strict=True)]) for key in KEYS)])
    print(f"\nconcurrency {args.concurrency}, {args.requests} chat requests of {args.max_tokens} tokens, device {args.device}, "
          f"{args.runs} triples (medians; ratios: medians of the triples' ratios)\n")
    print(table(["path", "TTFT p50 ms", "ITL p50 ms", "step ms"], rows))


if __name__ == "__main__":
    from tandem import lifecycle

    lifecycle.run(main())
