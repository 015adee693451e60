"""Token sampling: greedy, temperature, top-k, top-p, and seeded draws that depend only on (seed, position).

A seeded request's draw for the token at position p uses a generator seeded from (seed, p),
so the same request resumed elsewhere (after a migration) draws the same tokens.
"""

from __future__ import annotations

import torch

from tandem.engine.types import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a well-spread 63-bit generator seed."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k and top-p."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


class Sampler:
    def __init__(self, seed: int | None = None) -> None:
        self._unseeded = torch.Generator()
        if seed is None:
            self._unseeded.seed()
        else:
            self._unseeded.manual_seed(seed)
        self._seeded = torch.Generator()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
        """One token per row; ``positions`` are the indices the new tokens will take."""
        tokens = torch.argmax(logits, dim=-1).tolist()
        for row, (p, position) in enumerate(zip(params, positions, strict=True)):
            if p.greedy:
                continue
            probs = filtered_probs(logits[row], p)
            if p.seed is None:
                generator = self._unseeded
            else:
                generator = self._seeded
                generator.manual_seed(mix_seed(p.seed, position))
            # exponential race: argmax(p / E) with E ~ Exp(1) draws from p
            race = torch.empty_like(probs).exponential_(1.0, generator=generator)
            tokens[row] = int(torch.argmax(probs / race))
        return tokens
