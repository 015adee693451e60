"""What penalties, min_tokens and logprobs cost the hf engine's decode step, against plain sampling.

Runs batches of identical decoding requests in one process (default model, fp32), alternating the
plain batch with each variant, and prints the median forward-pass-plus-sampling step time of the
decode steps and the ratio to the plain batch run next to it (pairs cancel the host's drift).
Usage: python benchmarks/sampling_overhead.py [--batch 1 8] [--runs 5] [--max-tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from _stats import median, table  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "plain": {},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    "min_tokens": {"min_tokens": 16},
    "logprobs=0": {"logprobs": 0},
    "logprobs=20": {"logprobs": 20},
    "sampled t=0.8, top_p=0.9": {"temperature": 0.8, "top_p": 0.9},
    "sampled t=0.8 + all": {"temperature": 0.8, "seed": 1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                            "repetition_penalty": 1.2, "logprobs": 5},
}


async def run(engine, steps: list, batch: int, max_tokens: int, extra: dict[str, object]) -> float:  # type: ignore[no-untyped-def]
    """Median decode-step seconds of one batch of ``batch`` requests."""
    from tandem.engine.types import EngineRequest, SamplingParams

    ids = engine.tokenizer("Write a long story about a lighthouse keeper and the sea.")["input_ids"]
    fields = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, **extra}
    steps.clear()

    async def one(i: int) -> None:
        async for _ in engine.generate(EngineRequest(f"b{i}-{id(extra)}-{len(steps)}", ids,
                                                     SamplingParams(**fields))):  # type: ignore[arg-type]
            pass

    await asyncio.gather(*(one(i) for i in range(batch)))
    decode = [s.duration_s for s in steps if s.num_prefill_tokens == 0 and s.num_seqs == batch]
    return median(decode)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of the engine")
    parser.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M)")
    args = parser.parse_args()

    import torch

    from tandem.engine.config import EngineConfig
    from tandem.engine.hf.engine import HFEngine
    from tandem.models import resolve_model

    torch.set_num_threads(args.threads)
    steps: list = []
    engine = HFEngine(EngineConfig(model_path=resolve_model(args.model), num_threads=args.threads, batch_wait_ms=0,
                                   device=args.device), on_step=steps.append)
    await engine.start()
    rows = []
    try:
        await run(engine, steps, 2, 4, {})  # warm-up
        for batch in args.batch:
            for name, extra in VARIANTS.items():
                if name == "plain":
                    continue
                plain, variant, ratios = [], [], []
                for i in range(args.runs):
                    order = ((None, extra) if i % 2 == 0 else (extra, None))
                    pair: dict[str, float] = {}
                    for which in order:
                        key = "plain" if which is None else "variant"
                        pair[key] = await run(engine, steps, batch, args.max_tokens, which or {})
                    plain.append(pair["plain"])
                    variant.append(pair["variant"])
                    ratios.append(pair["variant"] / pair["plain"])
                rows.append([batch, name, 1000 * median(plain), 1000 * median(variant), median(ratios)])
    finally:
        await engine.shutdown()
    print(f"\n{args.runs} pairs per row, {args.max_tokens} tokens per request, {args.threads} torch thread(s), "
          f"{args.device}\n")
    print(table(["batch", "variant", "plain step ms", "variant step ms", "ratio"], rows))


if __name__ == "__main__":
    asyncio.run(main())
