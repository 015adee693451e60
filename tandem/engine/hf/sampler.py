"""Token sampling: penalties and min_tokens, then greedy, temperature, top-k, top-p, and seeded draws
that depend only on (seed, position).

A seeded request's draw for the token at position p uses a generator seeded from (seed, p),
so the same request resumed elsewhere (after a migration) draws the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from tandem.engine.types import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1

# One request's tokens so far, where its output starts (earlier output of a moved request
# included) and where its prompt on this engine ends.
History = tuple[Sequence[int], int, int]


def mix_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): a well-spread 63-bit generator seed."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def penalised_logits(logits: torch.Tensor, params: SamplingParams, history: History,
                     eos_token_ids: Collection[int]) -> torch.Tensor:
    """One row of logits after the request's penalties and min_tokens (a new tensor).

    Repetition penalty scales every token of the prompt and the output, as transformers' and vLLM's
    do; presence and frequency penalties (OpenAI's) count the output, including what the request
    generated before it moved here; the request's stop token ids (and ``eos_token_ids``, unless it
    ignores EOS) cannot be drawn before ``min_tokens`` tokens were generated here (a moved request's
    min_tokens is what was left of it, like max_tokens).
    """
    token_ids, output_start, prompt_end = history
    logits = logits.clone()
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0 and token_ids:
        seen_ids = torch.tensor(sorted({t for t in token_ids if t < vocab}), dtype=torch.long, device=logits.device)
        seen = logits[seen_ids]
        logits[seen_ids] = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    output = token_ids[output_start:]
    if (params.presence_penalty or params.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=logits.device),
                                minlength=vocab)[:vocab].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if len(token_ids) - prompt_end < params.min_tokens:
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        banned = [t for t in stop_ids if t < vocab]
        if banned:
            logits[banned] = float("-inf")
    return logits


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
    def __init__(self, seed: int | None = None, eos_token_ids: Collection[int] = ()) -> None:
        self._eos_token_ids = frozenset(eos_token_ids)
        self._unseeded = torch.Generator()
        if seed is None:
            self._unseeded.seed()
        else:
            self._unseeded.manual_seed(seed)
        self._seeded = torch.Generator()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               histories: Sequence[History] | None = None) -> list[int]:
        """One token per row; ``positions`` are the indices the new tokens will take.

        ``histories`` is needed only when a row has penalties or min_tokens; rows without them never
        touch it.
        """
        tokens = torch.argmax(logits, dim=-1).tolist()
        for row, (p, position) in enumerate(zip(params, positions, strict=True)):
            row_logits = logits[row]
            if p.penalised:
                if histories is None:
                    raise ValueError("a request with penalties or min_tokens needs its token history")
                row_logits = penalised_logits(row_logits, p, histories[row], self._eos_token_ids)
                if p.greedy:
                    tokens[row] = int(torch.argmax(row_logits))
            if p.greedy:
                continue
            probs = filtered_probs(row_logits, p)
            if p.seed is None:
                generator = self._unseeded
            else:
                generator = self._seeded
                generator.manual_seed(mix_seed(p.seed, position))
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. It runs on the CPU, where
            # the generators are, whatever the logits' device: a seeded request draws the same tokens
            # on a GPU worker as on a CPU one (after a migration, say).
            probs = probs.cpu()
            race = torch.empty_like(probs).exponential_(1.0, generator=generator)
            tokens[row] = int(torch.argmax(probs / race))
        return tokens


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprob | None]:
    """For each row that asked for logprobs: the drawn token's log-probability under the model's
    own distribution (the raw logits) and the ``params.logprobs`` most likely tokens; else None."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    for row, (p, token) in enumerate(zip(params, tokens, strict=True)):
        if p.logprobs is None:
            continue
        logprobs = torch.log_softmax(logits[row].float(), dim=-1)
        top: tuple[tuple[int, float], ...] = ()
        if p.logprobs:
            values, ids = torch.topk(logprobs, p.logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        out[row] = TokenLogprob(token, float(logprobs[token]), top)
    return out


def scored_logprobs(logits: torch.Tensor, targets: list[int], num_top: int) -> list[TokenLogprob]:
    """Row i's log-probability of ``targets[i]`` (the prompt token that follows its position) under
    the raw logits, with the ``num_top`` most likely tokens; rows go through in slices so a long
    prompt's log-softmax never holds more than one slice of the vocabulary at once."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), _SCORE_SLICE_ROWS):
        rows = torch.log_softmax(logits[start : start + _SCORE_SLICE_ROWS].float(), dim=-1)
        wanted = targets[start : start + _SCORE_SLICE_ROWS]
        values = rows.gather(1, torch.tensor(wanted, dtype=torch.long, device=rows.device)[:, None])[:, 0].tolist()
        tops: list[tuple[tuple[int, float], ...]] = [()] * len(values)
        if num_top:
            top_values, top_ids = torch.topk(rows, num_top, dim=-1)
            tops = [tuple(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_values.tolist(), strict=True)]
        out.extend(TokenLogprob(t, v, top) for t, v, top in zip(wanted, values, tops, strict=True))
    return out


_SCORE_SLICE_ROWS = 256
