"""How events travel: client messages parsed into events, server events as JSON text in pieces small
enough for small-MTU paths (`message.chunk`, which the client joins back in order), and the `/ws`
handshake (`session.start`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from realtime.events import CLIENT_EVENTS, ClientEvent, EventError, MessageChunk, ServerEvent
from runtime.audio import SAMPLE_RATE

MAX_MESSAGE_BYTES = 1100
WS_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class SessionStart:
    """The first message on `/ws` (a handshake, not an event): the sample rates of the PCM16 audio
    the client sends and wants back, and whether it cancels the echo of what it plays itself
    (`client_echo_cancellation`: false, and with `--echo-cancel auto` the server does)."""

    type: ClassVar[str] = "session.start"
    input_sample_rate: int
    output_sample_rate: int = SAMPLE_RATE
    client_echo_cancellation: bool | None = None

    @classmethod
    def parse(cls, raw: str) -> SessionStart:
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise EventError("invalid_session_start", "the first message must be JSON text: session.start") from None
        if not isinstance(msg, dict) or msg.get("type") != cls.type:
            raise EventError(
                "invalid_session_start", "the first message must be {type: 'session.start', input_sample_rate: N}"
            )
        rates = []
        for key, default in (("input_sample_rate", None), ("output_sample_rate", SAMPLE_RATE)):
            rate = msg.get(key, default)
            if type(rate) is not int or rate not in WS_SAMPLE_RATES:  # not 16000.0, not True
                raise EventError("invalid_session_start", f"{key} must be one of {list(WS_SAMPLE_RATES)}")
            rates.append(rate)
        client_cancels = msg.get("client_echo_cancellation")
        if client_cancels is not None and not isinstance(client_cancels, bool):
            raise EventError("invalid_session_start", "client_echo_cancellation must be true or false")
        return cls(rates[0], rates[1], client_cancels)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


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
    event_class = CLIENT_EVENTS.get(event_type)
    if event_class is None:
        raise EventError("unknown_event", f"unknown event type {event_type!r}")
    event_id = msg.get("event_id")
    return event_class.parse(msg, event_id if isinstance(event_id, str) else None)


class EventEncoder:
    """Serializes server events, splitting any over MAX_MESSAGE_BYTES into `message.chunk` pieces."""

    _ENVELOPE = '{"type":"message.chunk","id":%d,"index":%d,"count":%d,"data":""}'

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit
        self._ids = itertools.count(1)

    def encode(self, event: ServerEvent | dict[str, Any]) -> list[str]:
        text = json.dumps(event.to_dict() if isinstance(event, ServerEvent) else event, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode()) <= self._limit:
            return [text]
        chunk_id = next(self._ids)
        # Room for the envelope with generous digits for index/count.
        budget = self._limit - len((self._ENVELOPE % (chunk_id, 99999, 99999)).encode())
        pieces = self._split(text, budget)
        return [
            json.dumps(MessageChunk(chunk_id, i, len(pieces), piece).to_dict(), ensure_ascii=False, separators=(",", ":"))
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
        if message.get("type") != MessageChunk.type:
            return message
        parts = self._parts.setdefault(message["id"], {})
        parts[message["index"]] = message["data"]
        if len(parts) < message["count"]:
            return None
        del self._parts[message["id"]]
        return json.loads("".join(parts[i] for i in range(message["count"])))
