"""The event protocol's vocabulary, as code: one class per server event and per client event, after
the OpenAI Realtime API. A client event checks its own fields (`parse`); how events travel (JSON
text, pieces, the `/ws` handshake) is `wire.py`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from runtime.checks import json_number


class EventError(ValueError):
    """A client message that cannot be accepted; becomes an `error` event and changes nothing."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def ms_at_least_zero(msg: dict[str, Any], key: str) -> float:
    """`msg[key]`, a number of ms >= 0, or EventError."""
    value = json_number(msg.get(key))
    if value is None or value < 0:
        raise EventError("invalid_value", f"{key} must be a number >= 0")
    return value


# ---- server events ----------------------------------------------------------------------------

SERVER_EVENTS: dict[str, type[ServerEvent]] = {}


@dataclass(frozen=True)
class ServerEvent:
    """A message from the server; `to_dict()` is its JSON form."""

    type: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SERVER_EVENTS[cls.type] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class SessionCreated(ServerEvent):
    type = "session.created"
    session: dict[str, Any]


@dataclass(frozen=True)
class SessionUpdated(ServerEvent):
    type = "session.updated"
    session: dict[str, Any]


@dataclass(frozen=True)
class SessionState(ServerEvent):
    type = "session.state"
    state: str


@dataclass(frozen=True)
class SessionClosed(ServerEvent):
    """The server ends the call (`reason`: server_shutdown, media_timeout, client_too_slow, ...);
    the last event of a session, sent before its transport closes."""

    type = "session.closed"
    reason: str


@dataclass(frozen=True)
class SessionSummary(ServerEvent):
    """The session's counters so far (speculative starts, commits, cancels, responses, barge-ins)."""

    type = "session.summary"
    counters: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.counters}


@dataclass(frozen=True)
class SpeechStarted(ServerEvent):
    type = "input_audio_buffer.speech_started"
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped(ServerEvent):
    type = "input_audio_buffer.speech_stopped"
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class TranscriptionDelta(ServerEvent):
    """A provisional transcript of the utterance so far; each replaces the one before."""

    type = "conversation.item.input_audio_transcription.delta"
    item_id: str
    transcript: str


@dataclass(frozen=True)
class TranscriptionCompleted(ServerEvent):
    type = "conversation.item.input_audio_transcription.completed"
    item_id: str
    transcript: str


@dataclass(frozen=True)
class ResponseCreated(ServerEvent):
    type = "response.created"
    response_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "response": {"id": self.response_id, "status": "in_progress"}}


@dataclass(frozen=True)
class ResponseTextDelta(ServerEvent):
    type = "response.text.delta"
    response_id: str
    delta: str


@dataclass(frozen=True)
class ResponseAudioStarted(ServerEvent):
    type = "response.audio.started"
    response_id: str


@dataclass(frozen=True)
class ResponseAudioPaused(ServerEvent):
    """The user made a sound over the reply: its audio is silent, kept, until it resumes or ends."""

    type = "response.audio.paused"
    response_id: str


@dataclass(frozen=True)
class ResponseAudioResumed(ServerEvent):
    """The sound was not a turn: the reply plays on from where it paused. `item_id` and
    `transcript` name the speech heard meanwhile (a backchannel such as "mm-hmm"), if any."""

    type = "response.audio.resumed"
    response_id: str
    item_id: str | None = None
    transcript: str = ""


@dataclass(frozen=True)
class ResponseDone(ServerEvent):
    """The reply ended: `completed`, `interrupted` or `cancelled`, with the text the user heard."""

    type = "response.done"
    response_id: str
    status: str
    output_text: str

    def to_dict(self) -> dict[str, Any]:
        response = {"id": self.response_id, "status": self.status, "output_text": self.output_text}
        return {"type": self.type, "response": response}


@dataclass(frozen=True)
class FunctionCallArgumentsDone(ServerEvent):
    """The reply calls a function (`item_id` names the call in the history); it runs now."""

    type = "response.function_call_arguments.done"
    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ConversationItemCreated(ServerEvent):
    """An item joined the history: a function's output (`{id, type: function_call_output,
    call_id, output}`), once the function returned, failed or timed out."""

    type = "conversation.item.created"
    item: dict[str, Any]


@dataclass(frozen=True)
class MetricsTurn(ServerEvent):
    """One turn's stage timings (endpoint_ms, asr_ms, lm_ttft_ms, tts_first_audio_ms, server_v2v_ms)
    and how the turn was ended (commit_rule; eot_audio and eot_text, the end-of-turn scores; eot_question)."""

    type = "metrics.turn"
    response_id: str
    speculative: bool
    metrics: dict[str, float | str]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "response_id": self.response_id, "speculative": self.speculative, **self.metrics}


@dataclass(frozen=True)
class ConversationItemTruncated(ServerEvent):
    """A reply's history entry now holds what was heard in its first `audio_end_ms`."""

    type = "conversation.item.truncated"
    item_id: str
    audio_end_ms: float
    transcript: str


@dataclass(frozen=True)
class Pong(ServerEvent):
    """Answers a `ping` at once: the client measures the event path's round trip (and sees a stall)."""

    type = "pong"
    event_id: str | None = None  # the ping's


@dataclass(frozen=True)
class Error(ServerEvent):
    type = "error"
    code: str
    message: str
    event_id: str | None = None  # the client event it answers, if that had one

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": "invalid_request_error", "code": self.code, "message": self.message}
        if self.event_id is not None:
            error["event_id"] = self.event_id
        return {"type": self.type, "error": error}


@dataclass(frozen=True)
class MessageChunk(ServerEvent):
    """A piece of a server event too large for one message; `count` pieces with one `id` join back."""

    type = "message.chunk"
    id: int
    index: int
    count: int
    data: str


# ---- client events ----------------------------------------------------------------------------

CLIENT_EVENTS: dict[str, type[ClientEvent]] = {}


@dataclass(frozen=True)
class ClientEvent:
    """A checked message from the client; `parse` checks one, `to_dict()` writes one (for clients)."""

    type: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CLIENT_EVENTS[cls.type] = cls

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ClientEvent:
        return cls(event_id=event_id)  # type: ignore[call-arg]

    @property
    def data(self) -> dict[str, Any]:
        """The type-specific fields."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "event_id"}

    def to_dict(self) -> dict[str, Any]:
        event_id = getattr(self, "event_id", None)
        return {"type": self.type, **self.data, **({"event_id": event_id} if event_id is not None else {})}


@dataclass(frozen=True)
class Ping(ClientEvent):
    """Optional: a client that pings each second is missed sooner when it goes silent; answered by `pong`."""

    type = "ping"
    event_id: str | None = None


@dataclass(frozen=True)
class SessionUpdate(ClientEvent):
    """Changes the session's settings (the profile says which: turn_detection, or delay_ms)."""

    type = "session.update"
    session: dict[str, Any]
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> SessionUpdate:
        session = msg.get("session")
        if not isinstance(session, dict):
            raise EventError("invalid_value", "session.update needs a 'session' object")
        return cls(session, event_id)


@dataclass(frozen=True)
class ResponseCancel(ClientEvent):
    type = "response.cancel"
    event_id: str | None = None


@dataclass(frozen=True)
class InputAudioBufferCommit(ClientEvent):
    """Ends the user's turn now (the way to end one with turn_detection type `manual`)."""

    type = "input_audio_buffer.commit"
    event_id: str | None = None


@dataclass(frozen=True)
class InputAudioBufferClear(ClientEvent):
    """Forgets the user's speech under way: no turn is made of it."""

    type = "input_audio_buffer.clear"
    event_id: str | None = None


@dataclass(frozen=True)
class PlaybackPosition(ClientEvent):
    """How much of the reply the client has played: what the user heard, if interrupted."""

    type = "playback.position"
    position_ms: float
    response_id: str | None = None
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> PlaybackPosition:
        position = ms_at_least_zero(msg, "position_ms")
        response_id = msg.get("response_id")
        if response_id is not None and not isinstance(response_id, str):
            raise EventError("invalid_value", "response_id must be a string")
        return cls(position, response_id, event_id)


@dataclass(frozen=True)
class ConversationItemTruncate(ClientEvent):
    """The client played only `audio_end_ms` of a reply (`item_id`: its response id): the history
    keeps what was heard by then, even after the reply ended."""

    type = "conversation.item.truncate"
    item_id: str
    audio_end_ms: float
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ConversationItemTruncate:
        item_id = msg.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise EventError("invalid_value", "item_id must be the reply's id")
        return cls(item_id, ms_at_least_zero(msg, "audio_end_ms"), event_id)


@dataclass(frozen=True)
class ConversationItemCreate(ClientEvent):
    """A typed user message: answered at once, as a committed turn."""

    type = "conversation.item.create"
    text: str
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ConversationItemCreate:
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
        return cls(text, event_id)

    def to_dict(self) -> dict[str, Any]:
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": self.text}]}
        return {"type": self.type, "item": item, **({"event_id": self.event_id} if self.event_id else {})}
