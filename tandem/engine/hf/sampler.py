"""Token sampling: penalties and min_tokens, then greedy, temperature, top-k, top-p, and seeded draws
that depend only on (seed, position).

A seeded request's draw for the token at position p uses a generator seeded from (seed, p),
so the same request resumed elsewhere (after a migration) draws the same tokens on a worker of the
same device type. Draws run on the logits' device, with that device's generators (CPU and CUDA
generators are different algorithms, so a seed gives other tokens on a GPU than on a CPU).
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
    return filtered_probs_rows(logits[None], [params])[0]


def filtered_probs_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities of each row (one SamplingParams a row) after temperature, top-k and top-p.

    One sort serves every row: top-k keeps what is at least the row's k-th largest logit (ties
    included), top-p the smallest set of the most likely tokens whose mass reaches top_p.
    """
    rows, vocab = logits.shape
    device, dtype = logits.device, logits.dtype
    temperatures = torch.tensor([p.temperature for p in params], device=device, dtype=dtype)
    logits = logits / temperatures[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: never reached, nothing dropped
    if min(top_k) == vocab and min(top_p) > 1.0:
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    if min(top_k) < vocab:
        kth = sorted_logits.gather(1, torch.tensor(top_k, device=device)[:, None] - 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    if min(top_p) <= 1.0:
        # drop a token when the mass before it already reaches top_p (always keep the first)
        limits = torch.tensor(top_p, device=device, dtype=sorted_probs.dtype)[:, None]
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= limits
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)


class Sampler:
    def __init__(self, seed: int | None = None, eos_token_ids: Collection[int] = ()) -> None:
        self._eos_token_ids = frozenset(eos_token_ids)
        self._seed = seed
        self._generators: dict[torch.device, tuple[torch.Generator, torch.Generator]] = {}
        self._generators_on(torch.device("cpu"))

    def _generators_on(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """The (unseeded, seeded) generators of ``device``, made on first use."""
        pair = self._generators.get(device)
        if pair is None:
            unseeded = torch.Generator(device=device)
            if self._seed is None:
                unseeded.seed()
            else:
                unseeded.manual_seed(self._seed)
            pair = self._generators[device] = (unseeded, torch.Generator(device=device))
        return pair

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               histories: Sequence[History] | None = None) -> list[int]:
        """One token per row; ``positions`` are the indices the new tokens will take.

        ``histories`` is needed only when a row has penalties or min_tokens; rows without them never
        touch it.
        """
        tokens = torch.argmax(logits, dim=-1).tolist()
        drawn_rows: list[int] = []
        drawn_logits: list[torch.Tensor] = []
        for row, p in enumerate(params):
            row_logits = logits[row]
            if p.penalised:
                if histories is None:
                    raise ValueError("a request with penalties or min_tokens needs its token history")
                row_logits = penalised_logits(row_logits, p, histories[row], self._eos_token_ids)
                if p.greedy:
                    tokens[row] = int(torch.argmax(row_logits))
            if not p.greedy:
                drawn_rows.append(row)
                drawn_logits.append(row_logits)
        if not drawn_rows:
            return tokens
        # All the batch's draws at once, on the logits' device: one filtering pass, one race, one read.
        probs = filtered_probs_rows(torch.stack(drawn_logits), [params[row] for row in drawn_rows])
        unseeded, seeded = self._generators_on(probs.device)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Unseeded rows share one
        # draw of the noise; a seeded row's noise comes from (seed, position) alone.
        race = torch.empty_like(probs).exponential_(1.0, generator=unseeded)
        for index, row in enumerate(drawn_rows):
            seed = params[row].seed
            if seed is not None:
                seeded.manual_seed(mix_seed(seed, positions[row]))
                race[index].exponential_(1.0, generator=seeded)
        for row, token in zip(drawn_rows, torch.argmax(probs / race, dim=-1).tolist(), strict=True):
            tokens[row] = token
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
