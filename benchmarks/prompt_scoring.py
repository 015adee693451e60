"""What scoring a prompt (echo with logprobs, prompt_logprobs) costs the hf engine's prefill.

In one process (default model, fp32), prefills prompts of several lengths with max_tokens=1, each
scored and plain in alternating pairs; every prompt is new, so no run has a prefix-cache hit. Prints
the median prefill time (request in to its one token out) and the scored/plain ratio per pair.
Usage: python benchmarks/prompt_scoring.py [--tokens 128 1024] [--runs 5] [--top 0 5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from _stats import median, table  # noqa: E402

WORDS = ("river stone lantern harbour willow copper meadow thunder orchard signal velvet compass "
         "glacier ember canyon violet quarry saddle beacon tundra").split()


def fresh_prompt(tokenizer, num_tokens: int, serial: int) -> list[int]:  # type: ignore[no-untyped-def]
    """``num_tokens`` token ids that start unlike any earlier prompt's (no prefix-cache hit)."""
    words = [WORDS[(serial * 7 + i * 3) % len(WORDS)] for i in range(num_tokens)]
    ids = tokenizer.encode(f"Variant {serial}: " + " ".join(words))
    return ids[:num_tokens]


async def prefill_s(engine, ids: list[int], request_id: str, top: int | None) -> float:  # type: ignore[no-untyped-def]
    from tandem.engine.types import EngineRequest, SamplingParams

    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=top,
                              logprobs=top)
    started = time.perf_counter()
    async for out in engine.generate(EngineRequest(request_id, ids, sampling)):
        if top is not None:
            assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(ids) - 1
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, nargs="+", default=[0, 5], help="alternatives per scored token")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.engine import HFEngine
    from tandem.models import resolve_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(EngineConfig(model_path=resolve_model(None), num_threads=args.threads))
    await engine.start()
    serials = itertools.count()
    rows = []
    try:
        await prefill_s(engine, fresh_prompt(engine.tokenizer, 64, next(serials)), "warm", 0)
        for num_tokens in args.tokens:
            for top in args.top:
                plain, scored, ratios = [], [], []
                for i in range(args.runs):
                    pair: dict[str, float] = {}
                    for kind in (("plain", "scored") if i % 2 == 0 else ("scored", "plain")):
                        serial = next(serials)
                        ids = fresh_prompt(engine.tokenizer, num_tokens, serial)
                        pair[kind] = await prefill_s(engine, ids, f"{kind}-{serial}", top if kind == "scored" else None)
                    plain.append(pair["plain"])
                    scored.append(pair["scored"])
                    ratios.append(pair["scored"] / pair["plain"])
                rows.append([num_tokens, top, median(plain) * 1e3, median(scored) * 1e3, median(ratios),
                             f"{min(ratios):.3f}-{max(ratios):.3f}"])
    finally:
        await engine.shutdown()
    print(f"\n{args.runs} pairs per row, {args.threads} torch thread(s), every prompt new (no prefix hit)\n")
    print(table(["prompt tokens", "top", "plain prefill ms", "scored prefill ms", "scored/plain", "pair spread"],
                rows))


if __name__ == "__main__":
    asyncio.run(main())
