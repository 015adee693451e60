"""Chat messages in OpenAI's shape, checked and flattened into what chat templates expect."""

from __future__ import annotations

from typing import Any

from tandem.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name; chat templates know "system"


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    """Return ``[{"role", "content"}]`` with string contents; InvalidRequest names the bad field."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of messages", "messages")
    return [_normalise_message(index, message) for index, message in enumerate(messages)]


def _normalise_message(index: int, message: Any) -> dict[str, str]:
    field = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidRequest(f"{field} must be an object with 'role' and 'content'", field)
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(
            f"{field}.role must be one of {', '.join(sorted(ROLES))}, got {role!r}", f"{field}.role"
        )
    content = message.get("content")
    if isinstance(content, list):
        # OpenAI content parts: only text can reach a text-only model.
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{field}.content: only text parts are supported", f"{field}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidRequest(
            f"{field}.content is required and must be a string or a list of text parts", f"{field}.content"
        )
    return {"role": _ROLE_ALIASES.get(role, role), "content": content}
