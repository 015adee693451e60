"""The pipeline's request preparation with the real tokenizer: model check, chat template, prompt limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.frontend.pipeline import Pipeline
from tandem.engine.types import SamplingParams
from tandem.errors import InvalidRequest, NotFound

pytestmark = pytest.mark.unit


@pytest.fixture
async def pipeline(model_path: Path) -> AsyncIterator[Pipeline]:
    # The router channel is lazy: nothing connects unless a request is generated.
    pipeline = await Pipeline.from_model_dir(model_path, model_name="tiny", max_model_len=64,
                                             router_address="127.0.0.1:1")
    yield pipeline
    await pipeline.close()


async def test_check_model(pipeline: Pipeline) -> None:
    pipeline.check_model(None)
    pipeline.check_model("")
    pipeline.check_model("tiny")
    with pytest.raises(NotFound) as info:
        pipeline.check_model("gpt-4")
    assert info.value.field == "model" and "gpt-4" in info.value.message


async def test_chat_template_ends_with_the_generation_prompt(pipeline: Pipeline) -> None:
    token_ids = pipeline.apply_chat_template([{"role": "user", "content": "hi"}])
    text = pipeline.tokenizer.decode(token_ids)
    assert "hi" in text and text.rstrip().endswith("assistant")


async def test_chat_template_rejects_bad_messages(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidRequest) as info:
        pipeline.apply_chat_template([{"role": "user"}])
    assert info.value.field == "messages[0].content"
    with pytest.raises(InvalidRequest) as info:
        pipeline.apply_chat_template([])
    assert info.value.field == "messages"


async def test_prompt_too_long_names_both_lengths(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidRequest) as info:
        pipeline.validate_prompt(list(range(60)), SamplingParams(max_tokens=10), field="messages")
    assert info.value.field == "messages"
    assert "64" in info.value.message and "70" in info.value.message and "60" in info.value.message
    pipeline.validate_prompt(list(range(60)), SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequest):  # no max_tokens still needs room for one token
        pipeline.validate_prompt(list(range(64)), SamplingParams(max_tokens=None))


async def test_empty_prompt_and_unknown_token_ids(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidRequest, match="empty") as info:
        pipeline.validate_prompt(pipeline.tokenize(""), SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="vocabulary"):
        pipeline.validate_prompt([1, 10**9], SamplingParams())
