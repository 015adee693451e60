"""What drawing a batch's sampled tokens costs: the engine's sampler (the whole batch at once; top-p
looks for its nucleus among the 1,024 most likely tokens first; unseeded rows by inverse CDF, seeded
ones by an exponential race) against the way it drew before (each row alone: a sort of the whole
vocabulary, then an exponential race over it), on one device, in one invocation.

Rows are a SmolLM2-sized vocabulary of random logits with a language model's spread (standard
deviation 5, so temperature 0.8 and top_p 0.9 keep a handful of tokens; the table says how many),
half of them seeded. Prints median times and the ratio.
Usage: python benchmarks/sampler_rows.py [--device cuda] [--batch 1 8 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from _stats import median, table  # noqa: E402

VOCAB = 49152  # SmolLM2's
SPREAD = 5.0


def sort_and_race_by_row(logits, params) -> list[int]:  # type: ignore[no-untyped-def]
    """The previous way: per row, temperature, a full sort for top-p, scatter back, exponential race."""
    import torch

    tokens = []
    for row, p in enumerate(params):
        scaled = logits[row] / p.temperature
        probs = torch.softmax(scaled, dim=-1)
        sorted_probs, order = torch.sort(probs, descending=True)
        sorted_probs = sorted_probs.masked_fill((torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= p.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        race = torch.empty_like(probs).exponential_(1.0)
        tokens.append(int(torch.argmax(probs / race)))
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args()

    import torch

    from tandem.engine.hf.sampler import Sampler, candidates
    from tandem.engine.types import SamplingParams

    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn, *fn_args) -> float:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(args.repeats + 3):
            sync()
            started = time.perf_counter()
            fn(*fn_args)
            times.append(time.perf_counter() - started)
        return median(times[3:]) * 1e3

    torch.manual_seed(0)
    rows = []
    for batch in args.batch:
        logits = torch.randn(batch, VOCAB, device=args.device) * SPREAD
        params = [SamplingParams(temperature=0.8, top_p=0.9, seed=i if i % 2 else None) for i in range(batch)]
        probs, _ = candidates(logits, params)
        kept = median([float(n) for n in (probs > 0).sum(dim=-1).tolist()])
        sampler = Sampler(seed=1)
        now = timed(sampler.sample, logits, params, [7] * batch)
        before = timed(sort_and_race_by_row, logits, params)
        rows.append([batch, f"{kept:.0f}", f"{now:.2f}", f"{before:.2f}", f"{before / now:.1f}"])
    print(f"{VOCAB}-token rows on {args.device}, temperature 0.8, top_p 0.9; medians of {args.repeats}")
    print(table(["batch", "tokens kept", "sampler ms", "sort + race by row ms", "before / now"], rows))


if __name__ == "__main__":
    main()
