"""The event protocol on the data channel and the WebSocket: client messages parsed and checked,
server messages encoded in pieces small enough for small-MTU paths.

Vocabulary after the OpenAI Realtime API (see design.md). Server events larger than
MAX_MESSAGE_BYTES travel as `message.chunk` pieces that the client joins back in order.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE_BYTES = 1100

CLIENT_EVENT_TYPES = (
    "ping",
    "session.update",
    "response.cancel",
    "playback.position",
    "conversation.item.create",
)


class EventError(ValueError):
    """A client message that cannot be accepted; becomes an `error` event and changes nothing."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ClientEvent:
    """A checked client message. `data` holds the type-specific fields, already validated."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None


def error_event(code: str, message: str, event_id: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": "invalid_request_error", "code": code, "message": message}
    if event_id is not None:
        error["event_id"] = event_id
    return {"type": "error", "error": error}


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise EventError("invalid_value", f"{name} must be a number")
    return float(value)


def _check_session_update(msg: dict[str, Any]) -> dict[str, Any]:
    session = msg.get("session")
    if not isinstance(session, dict):
        raise EventError("invalid_value", "session.update needs a 'session' object")
    return {"session": session}


def _check_playback_position(msg: dict[str, Any]) -> dict[str, Any]:
    position = _number(msg.get("position_ms"), "position_ms")
    if position < 0:
        raise EventError("invalid_value", "position_ms must be >= 0")
    response_id = msg.get("response_id")
    if response_id is not None and not isinstance(response_id, str):
        raise EventError("invalid_value", "response_id must be a string")
    return {"position_ms": position, "response_id": response_id}


def _check_item_create(msg: dict[str, Any]) -> dict[str, Any]:
    item = msg.get("item")
    if not isinstance(item, dict) or item.get("role", "user") != "user":
        raise EventError("invalid_value", "conversation.item.create needs an 'item' with role 'user'")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise EventError("invalid_value", "item.content must be a non-empty list")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "input_text" or not isinstance(part.get("text"), str):
            raise EventError("invalid_value", "item.content parts must be {type: 'input_text', text: string}")
        texts.append(part["text"])
    text = " ".join(t.strip() for t in texts).strip()
    if not text:
        raise EventError("invalid_value", "item text is empty")
    return {"text": text}


_CHECKS = {
    "ping": lambda msg: {},
    "session.update": _check_session_update,
    "response.cancel": lambda msg: {},
    "playback.position": _check_playback_position,
    "conversation.item.create": _check_item_create,
}


def parse_client_event(raw: str | bytes) -> ClientEvent:
    """Parse one client message, or raise EventError with a code and a readable message."""
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > MAX_MESSAGE_BYTES:
        raise EventError("message_too_large", f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EventError("invalid_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise EventError("invalid_event", "message must be a JSON object")
    event_type = msg.get("type")
    if not isinstance(event_type, str):
        raise EventError("invalid_event", "message needs a string 'type'")
    check = _CHECKS.get(event_type)
    if check is None:
        raise EventError("unknown_event", f"unknown event type {event_type!r}")
    event_id = msg.get("event_id")
    return ClientEvent(event_type, check(msg), event_id if isinstance(event_id, str) else None)


class EventEncoder:
    """Serializes server events, splitting any over MAX_MESSAGE_BYTES into `message.chunk` pieces."""

    _ENVELOPE = '{"type":"message.chunk","id":%d,"index":%d,"count":%d,"data":""}'

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._ids = itertools.count(1)

    def encode(self, event: dict[str, Any]) -> list[str]:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode()) <= self._limit:
            return [text]
        chunk_id = next(self._ids)
        # Room for the envelope with generous digits for index/count.
        budget = self._limit - len((self._ENVELOPE % (chunk_id, 99999, 99999)).encode())
        pieces = self._split(text, budget)
        return [
            json.dumps(
                {"type": "message.chunk", "id": chunk_id, "index": i, "count": len(pieces), "data": piece},
                ensure_ascii=False,
                separators=(",", ":"),
            )
            for i, piece in enumerate(pieces)
        ]

    @staticmethod
    def _split(text: str, budget: int) -> list[str]:
        pieces, start, used = [], 0, 0
        for i, ch in enumerate(text):
            cost = len(json.dumps(ch, ensure_ascii=False).encode()) - 2
            if used + cost > budget:
                pieces.append(text[start:i])
                start, used = i, 0
            used += cost
        pieces.append(text[start:])
        return pieces


class ChunkJoiner:
    """The receiving side of EventEncoder: returns whole events, joining `message.chunk` pieces."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[int, str]] = {}

    def feed(self, text: str) -> dict[str, Any] | None:
        message = json.loads(text)
        if message.get("type") != "message.chunk":
            return message
        parts = self._parts.setdefault(message["id"], {})
        parts[message["index"]] = message["data"]
        if len(parts) < message["count"]:
            return None
        del self._parts[message["id"]]
        return json.loads("".join(parts[i] for i in range(message["count"])))
