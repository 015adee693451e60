"""Streaming detokenisation (never half a character) and stop strings (never leaked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizer(model_path: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.mark.parametrize("text", ["Hello, world! How are you?", "naïve café — ünïcödé ✓", "日本語のテキスト 🙂👍🏽", "  spaced\n\tlines  "])
def test_token_by_token_equals_whole_decode(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    prompt = tokenizer("Say:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add([t]) for t in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)


def test_multibyte_character_is_held_until_complete(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE splits the emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add([ids[-1]]) == "🙂"


def test_special_tokens_are_skipped(tokenizer) -> None:  # type: ignore[no-untyped-def]
    detok = IncrementalDetokenizer(tokenizer, [])
    text = detok.add(tokenizer("Hi", add_special_tokens=False)["input_ids"]) + detok.add([tokenizer.eos_token_id])
    assert text + detok.flush() == "Hi"


def test_stop_string_split_across_deltas_is_never_emitted() -> None:
    matcher = StopStringMatcher(["STOP"])
    out1, stopped1 = matcher.feed("abc ST")
    out2, stopped2 = matcher.feed("OP tail")
    assert (out1, stopped1) == ("abc", False)
    assert (out2, stopped2) == (" ", True)


def test_held_back_text_is_released_when_no_stop_follows() -> None:
    matcher = StopStringMatcher(["</end>"])
    out, stopped = matcher.feed("value </e")
    assert not stopped and "</e" not in out
    assert out + matcher.flush() == "value </e"


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(["world", "lo"])
    assert matcher.feed("hello world") == ("hel", True)


def test_no_stop_strings_passes_everything_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("x") == ("x", False)
