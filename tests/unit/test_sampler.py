"""Sampling: greedy, top-k/top-p filtering, and seeded draws that depend only on (seed, position)."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.hf.sampler import Sampler, filtered_probs, mix_seed
from tandem.engine.types import SamplingParams
from tandem.errors import InvalidRequest

pytestmark = pytest.mark.unit


def logits(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)])


def test_greedy_takes_the_argmax() -> None:
    out = Sampler(seed=1).sample(logits(0.1, 3.0, 0.2), [SamplingParams(temperature=0)], [5])
    assert out == [1]


def test_top_k_one_is_greedy_even_with_temperature() -> None:
    assert SamplingParams(temperature=1.5, top_k=1).greedy


def test_top_k_keeps_only_k_tokens() -> None:
    probs = filtered_probs(torch.tensor([1.0, 4.0, 3.0, 2.0]), SamplingParams(top_k=2))
    assert probs[0] == 0 and probs[3] == 0 and probs[1] > probs[2] > 0


def test_top_p_keeps_the_smallest_nucleus() -> None:
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered_probs(base, SamplingParams(top_p=0.7))
    assert probs[2] == 0 and probs[3] == 0
    assert torch.isclose(probs.sum(), torch.tensor(1.0))
    assert torch.isclose(probs[0], torch.tensor(0.5 / 0.8))


def test_seeded_draws_repeat_and_depend_on_position() -> None:
    row = torch.zeros(1, 1000)  # uniform: every draw is down to the generator
    params = [SamplingParams(temperature=1.0, seed=42)]
    first = [Sampler().sample(row, params, [p])[0] for p in range(20)]
    again = [Sampler().sample(row, params, [p])[0] for p in range(20)]
    assert first == again
    assert len(set(first)) > 10  # positions give different draws
    other = [Sampler().sample(row, [SamplingParams(temperature=1.0, seed=43)], [p])[0] for p in range(20)]
    assert other != first


def test_sampling_follows_the_distribution() -> None:
    row = torch.log(torch.tensor([[0.8, 0.2]]))
    sampler = Sampler(seed=0)
    draws = [sampler.sample(row, [SamplingParams(temperature=1.0)], [0])[0] for _ in range(2000)]
    assert 0.75 < draws.count(0) / len(draws) < 0.85


def test_mix_seed_spreads() -> None:
    assert len({mix_seed(1, p) for p in range(1000)}) == 1000
    assert all(0 <= mix_seed(2**63 - 1, p) < 2**63 for p in range(10))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
