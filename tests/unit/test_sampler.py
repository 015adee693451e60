"""Sampling: greedy, top-k/top-p filtering, and seeded draws that depend only on (seed, position)."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.hf.sampler import (
    NUCLEUS_CANDIDATES,
    Sampler,
    candidates,
    mix_seed,
    penalised_logits,
    token_logprobs,
)
from tandem.engine.types import SamplingParams
from tandem.errors import InvalidRequest

pytestmark = pytest.mark.unit


def logits(*values: float) -> torch.Tensor:
    return torch.tensor([list(values)])


def filtered(rows: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """candidates() spread back over the vocabulary and normalised: one probability a token."""
    probs, ids = candidates(rows, params)
    dense = probs if ids is None else torch.zeros_like(rows).scatter_(1, ids, probs)
    return dense / dense.sum(dim=-1, keepdim=True)


def test_greedy_takes_the_argmax() -> None:
    out = Sampler(seed=1).sample(logits(0.1, 3.0, 0.2), [SamplingParams(temperature=0)], [5])
    assert out == [1]


def test_top_k_one_is_greedy_even_with_temperature() -> None:
    assert SamplingParams(temperature=1.5, top_k=1).greedy


def test_top_k_keeps_only_k_tokens() -> None:
    probs = filtered(torch.tensor([[1.0, 4.0, 3.0, 2.0]]), [SamplingParams(top_k=2)])[0]
    assert probs[0] == 0 and probs[3] == 0 and probs[1] > probs[2] > 0


def test_top_p_keeps_the_smallest_nucleus() -> None:
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = filtered(base[None], [SamplingParams(top_p=0.7)])[0]
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


def test_repetition_penalty_scales_prompt_and_output_tokens_by_sign() -> None:
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = penalised_logits(row, SamplingParams(repetition_penalty=2.0), ([0, 1, 0], 2, 2), ())
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # each seen token once, whatever its count
    assert row.tolist() == [2.0, -2.0, 1.0, 0.5]  # the batch's logits are left alone


def test_presence_and_frequency_count_only_the_output_including_resumed_output() -> None:
    row = torch.zeros(4)
    # Tokens 0 and 1 are the prompt; 3 came before a migration (output_start 2), 3 and 2 after.
    history = ([0, 1, 3, 3, 2], 2, 3)
    out = penalised_logits(row, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), history, ())
    assert out.tolist() == [0.0, 0.0, -0.75, -1.0]


def test_min_tokens_bans_stop_tokens_until_enough_were_generated_here() -> None:
    params = SamplingParams(min_tokens=2, temperature=0)
    eos_first = logits(0.0, 5.0, 1.0)
    sampler = Sampler(eos_token_ids={1})
    assert sampler.sample(eos_first, [params], [3], [([7, 8, 2], 2, 2)]) == [2]  # one generated: banned
    assert sampler.sample(eos_first, [params], [4], [([7, 8, 2, 2], 2, 2)]) == [1]  # two: allowed
    stop_id = SamplingParams(min_tokens=2, temperature=0, stop_token_ids=[1], ignore_eos=True)
    assert Sampler().sample(eos_first, [stop_id], [3], [([7, 8, 2], 2, 2)]) == [2]


def test_penalties_without_a_history_fail_loudly() -> None:
    with pytest.raises(ValueError, match="history"):
        Sampler().sample(logits(1.0, 2.0), [SamplingParams(frequency_penalty=1.0, temperature=0)], [1])


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0.0), ("min_tokens", -1),
])
def test_penalty_settings_out_of_range_name_their_field(field: str, value: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_logprobs_are_the_models_own_distribution_with_the_top_alternatives() -> None:
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0.5, logprobs=2), SamplingParams()]
    first, second = token_logprobs(rows, params, [2, 0])
    expected = torch.log_softmax(rows[0], dim=-1)
    assert first is not None and second is None  # only the row that asked
    assert first.token_id == 2 and first.logprob == pytest.approx(float(expected[2]))  # not tempered
    assert [t for t, _ in first.top] == [1, 2]
    assert [lp for _, lp in first.top] == pytest.approx([float(expected[1]), float(expected[2])])
    only_drawn = token_logprobs(rows[:1], [SamplingParams(logprobs=0)], [3])[0]
    assert only_drawn is not None and only_drawn.top == ()


# The engine samples from logits on its model's device: every sampling path has to work there, with
# that device's generators (a GPU worker once failed every request with temperature > 0: its
# generators were on the CPU). The cuda cases run wherever a GPU is.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_every_sampling_path_works_on_the_logits_device(device: str) -> None:
    torch.manual_seed(0)
    rows = torch.randn(5, 300).to(device)
    history = ([1, 2, 3, 3, 250], 3, 3)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5),
        SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[int(rows[3].argmax())], logprobs=3),
        SamplingParams(temperature=0, repetition_penalty=1.2),
    ]
    tokens = Sampler(seed=1, eos_token_ids={0}).sample(rows, params, [10] * 5, [history] * 5)
    assert all(0 <= t < 300 for t in tokens)
    assert tokens[3] != int(rows[3].argmax())  # min_tokens banned the stop token
    logprob = token_logprobs(rows, params, tokens)[3]
    assert logprob is not None and logprob.token_id == tokens[3] and len(logprob.top) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_draws_on_a_device_repeat_and_depend_on_position(device: str) -> None:
    torch.manual_seed(0)
    rows = torch.randn(1, 1000).to(device)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1234)]
    first = [Sampler().sample(rows, params, [p])[0] for p in range(30)]
    again = [Sampler(seed=99).sample(rows, params, [p])[0] for p in range(30)]  # the engine's seed plays no part
    assert first == again
    assert len(set(first)) > 10


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_draws_follow_the_distribution_on_a_device(device: str) -> None:
    row = torch.log(torch.tensor([[0.8, 0.2]])).to(device)
    sampler = Sampler(seed=0)
    draws = [sampler.sample(row, [SamplingParams(temperature=1.0)], [0])[0] for _ in range(2000)]
    assert 0.75 < draws.count(0) / len(draws) < 0.85


def test_a_seeded_draw_does_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    rows = torch.randn(4, 500)
    mine = SamplingParams(temperature=0.9, top_k=100, seed=5)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(temperature=0.5, seed=6)]
    alone = [Sampler().sample(rows[2:3], [mine], [p])[0] for p in range(30)]
    batched = [Sampler().sample(rows, [others[0], others[1], mine, others[2]], [p, p, p, p])[2] for p in range(30)]
    assert batched == alone


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [50, 3 * NUCLEUS_CANDIDATES])  # the full sort, and the first look's top-k
def test_rows_are_filtered_each_by_its_own_settings(device: str, vocab: int) -> None:
    torch.manual_seed(0)
    rows = torch.randn(4, vocab) * 3
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.5),
              SamplingParams(temperature=1.3, top_k=10, top_p=0.8), SamplingParams(temperature=2.0)]
    on_device = rows.to(device)
    together = torch.cat([filtered(on_device[:3], params[:3]), filtered(on_device[3:], params[3:])]).cpu()
    for row, p in enumerate(params):
        assert torch.allclose(together[row], _one_row(rows[row], p), atol=1e-6)
    assert int((together[0] > 0).sum()) == 5 and int((together[3] > 0).sum()) == vocab


def test_a_nucleus_wider_than_the_first_look_is_found_whole() -> None:
    # nearly flat: top_p=0.5 keeps about half of 3 x NUCLEUS_CANDIDATES tokens
    flat = -torch.arange(3 * NUCLEUS_CANDIDATES, dtype=torch.float32)[None] * 1e-4
    probs = filtered(flat, [SamplingParams(top_p=0.5)])[0]
    assert int((probs > 0).sum()) > NUCLEUS_CANDIDATES
    assert torch.allclose(probs, _one_row(flat[0], SamplingParams(top_p=0.5)), atol=1e-7)


def test_draws_never_take_a_dropped_or_banned_token() -> None:
    row = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(seed=3)
    nucleus = {sampler.sample(row, [SamplingParams(top_p=0.7)], [0])[0] for _ in range(300)}
    assert nucleus == {0, 1}
    banned = row.clone()
    banned[0, 0] = float("-inf")
    assert 0 not in {sampler.sample(banned, [SamplingParams(temperature=1.0)], [0])[0] for _ in range(300)}


def _one_row(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The filter written plainly for one row: temperature, the k largest, then the top_p nucleus."""
    logits = logits / params.temperature
    if params.top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, params.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        kept, mass = torch.zeros_like(probs), 0.0
        for index in torch.argsort(probs, descending=True).tolist():
            if mass >= params.top_p:
                break
            kept[index], mass = probs[index], mass + float(probs[index])
        probs = kept / kept.sum()
    return probs


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(temperature=0.8, top_p=0.9, seed=3)])
def test_seeded_draws_survive_logits_that_differ_in_the_last_bits(params: SamplingParams) -> None:
    # A migrated request's next worker prefills what this one decoded: its logits differ a little.
    # Each token keeps its own noise, so the draws stay the same (inverse-CDF draws kept 86% here).
    torch.manual_seed(0)
    rows = torch.randn(1, 49152) * 3
    moved = rows + torch.randn_like(rows) * 1e-3
    here = [Sampler().sample(rows, [params], [p])[0] for p in range(300)]
    there = [Sampler().sample(moved, [params], [p])[0] for p in range(300)]
    assert sum(a == b for a, b in zip(here, there, strict=True)) >= 0.98 * len(here)


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_draws_from_a_nucleus_follow_its_distribution(device: str) -> None:
    row = torch.log(torch.tensor([[0.05, 0.3, 0.15, 0.5]])).to(device)  # the nucleus of 0.7: tokens 3 and 1
    sampler = Sampler(seed=0)
    draws = [sampler.sample(row, [SamplingParams(top_p=0.7)], [0])[0] for _ in range(3000)]
    assert set(draws) == {1, 3}
    assert 0.59 < draws.count(3) / len(draws) < 0.66  # 0.5 / 0.8
