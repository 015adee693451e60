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


# A top_p row's nucleus is looked for among this many of its most likely tokens first: sorting the
# whole vocabulary costs ten times as much on a CPU (3.8 against 0.37 ms for 49,152 tokens), and a
# model's nucleus is rarely that wide. A row whose nucleus is wider falls back to the full sort.
NUCLEUS_CANDIDATES = 1024


def truncates(params: SamplingParams) -> bool:
    """Whether top-k or top-p leave only some of the vocabulary to draw from."""
    return params.top_k > 0 or params.top_p < 1.0


def candidates(logits: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's tokens that can be drawn and their probabilities, after temperature, top-k and top-p.

    Either every row truncates (top_k or top_p) or none does. With none, the probabilities cover the
    whole vocabulary (ids None: a column is its token id). Otherwise the rows' K most likely tokens,
    most likely first, with their ids: top-k keeps what is at least the row's k-th largest logit, and
    top-p the smallest set of the most likely tokens whose mass reaches top_p (always the first);
    what is dropped has probability 0. Probabilities need not sum to 1 (no draw here needs it).
    """
    vocab = logits.shape[1]
    device, dtype = logits.device, logits.dtype
    temperatures = torch.tensor([p.temperature for p in params], device=device, dtype=dtype)
    logits = logits / temperatures[:, None]
    if not any(truncates(p) for p in params):
        return torch.softmax(logits, dim=-1), None
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: never reached, nothing dropped
    wide = NUCLEUS_CANDIDATES if min(top_p) <= 1.0 else 0
    probs, ids = _top_candidates(logits, top_k, top_p, min(vocab, max(max(top_k), wide)))
    if probs is None:  # a nucleus wider than NUCLEUS_CANDIDATES: the whole vocabulary, sorted
        probs, ids = _top_candidates(logits, top_k, top_p, vocab)
    assert probs is not None
    return probs, ids


def _top_candidates(logits: torch.Tensor, top_k: list[int], top_p: list[float], count: int
                    ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """candidates() among each row's ``count`` most likely tokens; None if a nucleus needs more."""
    device = logits.device
    values, ids = torch.topk(logits, count, dim=-1)  # sorted, most likely first
    limited = [k > 0 for k in top_k]
    if any(limited):
        kth = values.gather(1, (torch.tensor([k or count for k in top_k], device=device) - 1)[:, None])
        values = values.masked_fill(values < kth, float("-inf"))
    # A row's probabilities are over its top-k tokens, or over the whole vocabulary without top_k.
    norm = torch.logsumexp(logits, dim=-1)
    if any(limited):
        norm = torch.where(torch.tensor(limited, device=device), torch.logsumexp(values, dim=-1), norm)
    probs = torch.exp(values - norm[:, None])
    if min(top_p) <= 1.0:
        limits = torch.tensor(top_p, device=device, dtype=probs.dtype)
        mass = torch.cumsum(probs, dim=-1)
        needed = torch.tensor([q if q <= 1.0 else 0.0 for q in top_p], device=device, dtype=probs.dtype)
        if count < logits.shape[1] and bool((mass[:, -1] < needed).any()):
            return None, ids
        # drop a token when the mass before it already reaches top_p (always keep the first)
        probs = probs.masked_fill((mass - probs) >= limits[:, None], 0.0)
    return probs, ids


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
        # The batch's draws at once, on the logits' device: the rows that truncate (top-k, top-p)
        # together, the rest together, each with one filtering pass, then one read of every draw.
        drawn: list[tuple[list[int], torch.Tensor]] = []
        for group in ([i for i, row in enumerate(drawn_rows) if truncates(params[row])],
                      [i for i, row in enumerate(drawn_rows) if not truncates(params[row])]):
            if not group:
                continue
            group_rows = [drawn_rows[i] for i in group]
            probs, ids = candidates(torch.stack([drawn_logits[i] for i in group]), [params[r] for r in group_rows])
            seeded = [i for i, row in enumerate(group_rows) if params[row].seed is not None]
            unseeded = [i for i, row in enumerate(group_rows) if params[row].seed is None]
            if unseeded:  # nothing to repeat: the cheapest exact draw, by inverse CDF over the candidates
                picked = self._inverse_cdf(probs[unseeded])
                drawn.append(([group_rows[i] for i in unseeded],
                               picked if ids is None else ids[unseeded].gather(1, picked[:, None])[:, 0]))
            if seeded:
                rows_probs = probs[seeded]
                if ids is not None:  # back over the vocabulary: a token's noise is its own, whatever its rank
                    rows_probs = torch.zeros(len(seeded), logits.shape[-1], device=probs.device,
                                             dtype=probs.dtype).scatter_(1, ids[seeded], rows_probs)
                seeds = [(params[group_rows[i]].seed or 0, positions[group_rows[i]]) for i in seeded]
                drawn.append(([group_rows[i] for i in seeded], self._seeded_race(rows_probs, seeds)))
        for rows, picked in drawn:
            for row, token in zip(rows, picked.tolist(), strict=True):
                tokens[row] = token
        return tokens

    def _inverse_cdf(self, probs: torch.Tensor) -> torch.Tensor:
        """One column of each row, drawn in proportion to its value (need not sum to 1)."""
        unseeded, _ = self._generators_on(probs.device)
        cdf = torch.cumsum(probs.double(), dim=-1)
        uniform = torch.rand(probs.shape[0], generator=unseeded, device=probs.device, dtype=torch.float64)
        # the first column whose cumulative mass passes the target: never one of probability 0
        target = (uniform * cdf[:, -1])[:, None]
        return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)

    def _seeded_race(self, probs: torch.Tensor, seeds: list[tuple[int, int]]) -> torch.Tensor:
        """One token of each row of ``probs`` (over the vocabulary), drawn in proportion to its probability
        with noise that comes from each row's (seed, position) alone.

        Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each token has its own noise, so a
        request that moved to another worker, whose logits differ from this one's in the last bits (a
        prefill of what was decoded here), still draws the same tokens unless two tokens nearly tie.
        A seeded draw by inverse CDF moved in 3 of 5 runs of the migration test: there a small change
        in any token before the drawn one shifts the boundaries.
        """
        _, generator = self._generators_on(probs.device)
        race = torch.empty_like(probs)
        for row, (seed, position) in enumerate(seeds):
            generator.manual_seed(mix_seed(seed, position))
            race[row].exponential_(1.0, generator=generator)
        return torch.argmax(probs / race, dim=-1)


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
