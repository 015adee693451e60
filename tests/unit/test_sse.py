"""SSE framing: one ``data:`` line per event, blank-line separated, ``[DONE]`` last."""

from __future__ import annotations

import json

import pytest

from services.frontend import sse

pytestmark = pytest.mark.unit


def test_event_is_one_data_line_and_a_blank_line() -> None:
    frame = sse.encode_event({"text": "a\nb", "n": 1})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # the newline in the text is escaped inside the JSON
    assert json.loads(frame[len(b"data: "):]) == {"text": "a\nb", "n": 1}


def test_non_ascii_text_is_sent_as_utf8() -> None:
    frame = sse.encode_event({"text": "héllo 世界"})
    assert "héllo 世界".encode() in frame


def test_done_marker() -> None:
    assert sse.DONE == b"data: [DONE]\n\n"


def test_decode_round_trip() -> None:
    body = sse.encode_event({"i": 0}) + sse.encode_event({"i": 1}) + sse.DONE
    assert sse.decode_events(body) == ['{"i":0}', '{"i":1}', "[DONE]"]


def test_decode_ignores_comments_and_joins_multiline_data() -> None:
    assert sse.decode_events(": keep-alive\n\ndata: a\ndata: b\r\n\r\ndata:[DONE]\n\n") == ["a\nb", "[DONE]"]
