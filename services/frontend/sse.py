"""Server-sent events framing for OpenAI-style streams: ``data: <json>\\n\\n`` ending in ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = "text/event-stream"


class SseResponse(web.StreamResponse):
    """A streamed response whose headers leave with its first write, in one send, as aiohttp's
    ``Response`` sends them (a ``StreamResponse`` sends them alone the moment it is prepared). A stream
    is prepared when its first event is ready, so a separate send only delays that event."""

    _send_headers_immediately = False


def encode_event(payload: Any) -> bytes:
    """One ``data:`` event. Compact JSON never contains a raw newline, so one line is always enough."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def decode_events(body: bytes | str) -> list[str]:
    """The ``data`` fields of a complete stream, in order (multi-line data joined by newlines)."""
    text = body.decode() if isinstance(body, bytes) else body
    events: list[str] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if lines:
            events.append("\n".join(lines))
    return events
