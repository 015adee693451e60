"""Streaming detokenisation and stop strings, shared by every engine.

Text is released only when it is final: never half of a multi-byte character (decoding
ends in U+FFFD until the rest arrives), and never the start of what may become a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output so word boundaries come out right


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas (after vLLM's offset scheme)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _decode(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=True))

    def add(self, token_ids: Sequence[int]) -> str:
        """Text newly completed by ``token_ids``; may be empty while a character is incomplete."""
        self._tokens.extend(token_ids)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation (an incomplete character)."""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._tokens[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._tokens)
        return full_text[len(prefix_text) :]


class StopStringMatcher:
    """Holds back the tail that could begin a stop string; reports when one appears.

    OpenAI semantics: the stop string itself is not part of the output.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        if not self._stop:
            return text, False
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            emitted, self._pending = self._pending[:cut], ""
            return emitted, True
        if self._hold == 0:
            emitted, self._pending = self._pending, ""
        else:
            emitted = self._pending[: -self._hold] if len(self._pending) > self._hold else ""
            self._pending = self._pending[len(emitted) :]
        return emitted, False

    def flush(self) -> str:
        emitted, self._pending = self._pending, ""
        return emitted
