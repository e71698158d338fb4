"""The event protocol's vocabulary, as code: one class per server event and per client event, after
the OpenAI Realtime API. A client event checks its own fields (`parse`); how events travel (JSON
text, pieces, the `/ws` handshake) is `wire.py`'s.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
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
class TimeoutTriggered(ServerEvent):
    """The user said nothing for `idle_timeout_ms` after a reply had played (from `audio_start_ms`
    to `audio_end_ms` of the call's input): the agent asks whether they are still there."""

    type = "input_audio_buffer.timeout_triggered"
    item_id: str
    audio_start_ms: int
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
    """A reply is committed. `order` is the `response.create` that asked for it, if one did (its
    `metadata`, out of band or not, text only or not)."""

    type = "response.created"
    response_id: str
    order: ResponseOrder | None = None

    def to_dict(self) -> dict[str, Any]:
        response: dict[str, Any] = {"id": self.response_id, "status": "in_progress"}
        if self.order is not None and self.order.metadata is not None:
            response["metadata"] = self.order.metadata
        return {"type": self.type, "response": response}


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
    call_id, output}`), once the function returned, failed or timed out, or an item the client
    added (`conversation.item.create`), in the form of `Item.to_dict()`."""

    type = "conversation.item.created"
    item: dict[str, Any]


@dataclass(frozen=True)
class ConversationItemRetrieved(ServerEvent):
    """The answer to `conversation.item.retrieve`: the item as the history holds it now."""

    type = "conversation.item.retrieved"
    item: dict[str, Any]


@dataclass(frozen=True)
class ConversationItemDeleted(ServerEvent):
    """The item left the history (`conversation.item.delete`): later replies no longer see it."""

    type = "conversation.item.deleted"
    item_id: str


@dataclass(frozen=True)
class InputAudioBufferCleared(ServerEvent):
    """The answer to `input_audio_buffer.clear`: no turn is made of the speech so far."""

    type = "input_audio_buffer.cleared"


@dataclass(frozen=True)
class MetricsTurn(ServerEvent):
    """One turn's stage timings (endpoint_ms, asr_ms, lm_ttft_ms, tts_first_audio_ms, server_v2v_ms)
    and how the turn was ended (commit_rule; eot_audio and eot_text, the end-of-turn scores; eot_question; eot_noisy)."""

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


ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class Item:
    """One history item as a client gives it or asks for it: a message (`role` user, assistant or
    system, and its `text`), a `function_call` (`text`: its arguments) or a `function_call_output`
    (`text`: the output). `kind` is the role for a message, else the item type, as the history's."""

    id: str
    kind: str
    text: str
    call_id: str = ""
    name: str = ""
    status: str = "completed"

    @classmethod
    def parse(cls, item: Any, default_id: str) -> Item:
        if not isinstance(item, dict):
            raise EventError("invalid_value", "conversation.item.create needs an 'item' object")
        item_id = item.get("id", default_id)
        if not isinstance(item_id, str) or not 0 < len(item_id) <= 64:
            raise EventError("invalid_value", "item.id must be a string of 1 to 64 characters")
        kind = item.get("type", "message")
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id or not isinstance(output, str):
                raise EventError("invalid_value", "a function_call_output item needs a string call_id and output")
            return cls(item_id, kind, output, call_id=call_id)
        if kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
            if not all(isinstance(v, str) for v in (call_id, name, arguments)) or not call_id or not name:
                raise EventError("invalid_value", "a function_call item needs a string call_id, name and arguments")
            return cls(item_id, kind, arguments, call_id=call_id, name=name)
        if kind != "message":
            raise EventError("invalid_value", "item.type must be message, function_call or function_call_output")
        role = item.get("role", "user")
        if role not in ROLES:
            raise EventError("invalid_value", f"item.role must be one of {list(ROLES)}")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise EventError("invalid_value", "item.content must be a non-empty list")
        texts = []
        for part in content:
            text = part.get("text", part.get("transcript")) if isinstance(part, dict) else None
            if not isinstance(text, str) or part.get("type") not in _TEXT_PARTS[role]:
                raise EventError("invalid_value", f"{role} item.content parts must be {{type: {' or '.join(_TEXT_PARTS[role])}, text: string}}")
            texts.append(text)
        text = " ".join(t.strip() for t in texts).strip()
        if not text:
            raise EventError("invalid_value", "item text is empty")
        return cls(item_id, role, text)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "function_call_output":
            return {"id": self.id, "type": self.kind, "call_id": self.call_id, "output": self.text}
        if self.kind == "function_call":
            return {"id": self.id, "type": self.kind, "call_id": self.call_id, "name": self.name, "arguments": self.text}
        part = {"type": "output_text" if self.kind == "assistant" else "input_text", "text": self.text}
        return {"id": self.id, "type": "message", "role": self.kind, "status": self.status, "content": [part]}


_TEXT_PARTS = {"user": ("input_text",), "system": ("input_text",), "assistant": ("output_text", "output_audio", "text")}


@dataclass(frozen=True)
class ConversationItemCreate(ClientEvent):
    """An item for the history (`Item`). On this protocol a user message is a typed turn, answered
    at once (`respond`); any other item is added, and answered with the next reply."""

    type = "conversation.item.create"
    item: Item
    respond: bool = True
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None, respond: bool | None = None) -> ConversationItemCreate:
        item = Item.parse(msg.get("item"), "item_" + uuid.uuid4().hex[:12])
        return cls(item, item.kind == "user" if respond is None else respond, event_id)

    def to_dict(self) -> dict[str, Any]:
        item = {k: v for k, v in self.item.to_dict().items() if k != "status"}
        return {"type": self.type, "item": item, **({"event_id": self.event_id} if self.event_id else {})}


@dataclass(frozen=True)
class ConversationItemRetrieve(ClientEvent):
    """Asks for an item of the history as it is now: answered by `conversation.item.retrieved`."""

    type = "conversation.item.retrieve"
    item_id: str
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ConversationItemRetrieve:
        return cls(_item_id(msg), event_id)


@dataclass(frozen=True)
class ConversationItemDelete(ClientEvent):
    """Takes an item out of the history: answered by `conversation.item.deleted`."""

    type = "conversation.item.delete"
    item_id: str
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ConversationItemDelete:
        return cls(_item_id(msg), event_id)


def _item_id(msg: dict[str, Any]) -> str:
    item_id = msg.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise EventError("invalid_value", "item_id must name an item of this session")
    return item_id


@dataclass(frozen=True)
class ResponseOrder:
    """What a `response.create` asks of its reply: other `instructions` (the system prompt, for
    this reply only), `metadata` echoed in its events, `out_of_band` (conversation `none`: the
    reply is not added to the history), `text_only` (no speech). The server's own replies may
    `say` a fixed sentence instead of asking the LM (the idle prompt)."""

    instructions: str | None = None
    metadata: dict[str, str] | None = None
    out_of_band: bool = False
    text_only: bool = False
    say: str | None = None

    @classmethod
    def parse(cls, response: Any) -> ResponseOrder:
        if response is None:
            return cls()
        if not isinstance(response, dict):
            raise EventError("invalid_value", "response must be an object")
        instructions = response.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise EventError("invalid_value", "response.instructions must be a string")
        metadata = response.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or len(metadata) > 16 or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise EventError("invalid_value", "response.metadata must be an object of at most 16 string values")
        conversation = response.get("conversation", "auto")
        if conversation not in ("auto", "none"):
            raise EventError("invalid_value", "response.conversation must be 'auto' or 'none'")
        modalities = response.get("output_modalities", ["audio"])
        if modalities not in (["audio"], ["text"]):
            raise EventError("invalid_value", "response.output_modalities must be ['audio'] or ['text']")
        if response.get("input") is not None:
            raise EventError("unsupported", "response.input is not supported: a reply answers the conversation")
        return cls(instructions, metadata, conversation == "none", modalities == ["text"])


@dataclass(frozen=True)
class ResponseCreate(ClientEvent):
    """Starts a reply to the conversation as it stands (after items added without one, or with
    turn_detection's `create_response` off); `order` says what is special about it."""

    type = "response.create"
    order: ResponseOrder = field(default_factory=ResponseOrder)
    event_id: str | None = None

    @classmethod
    def parse(cls, msg: dict[str, Any], event_id: str | None) -> ResponseCreate:
        return cls(ResponseOrder.parse(msg.get("response")), event_id)

    def to_dict(self) -> dict[str, Any]:
        order = self.order
        response: dict[str, Any] = {"conversation": "none" if order.out_of_band else "auto", "output_modalities": ["text" if order.text_only else "audio"]}
        if order.instructions is not None:
            response["instructions"] = order.instructions
        if order.metadata is not None:
            response["metadata"] = order.metadata
        return {"type": self.type, "response": response, **({"event_id": self.event_id} if self.event_id else {})}
