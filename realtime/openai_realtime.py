"""`/v1/realtime`: the OpenAI Realtime API (GA) over a WebSocket, so that clients written for it
(the official SDKs, openai-agents, LiveKit's and Pipecat's OpenAI services) talk to this server
unchanged. A transport only: it translates messages both ways, and the Controller decides
everything as on any other transport; the session object is `openai_session.py`'s.

Audio is base64 PCM16 mono at 24 kHz both ways. Each item has GA's lifecycle: a committed user turn
is `conversation.item.added` / `.done` (its transcript follows); a reply is `response.created`, its
message `response.output_item.added`, `conversation.item.added`, `response.content_part.added`, the
deltas, then the `.done` of each in reverse order and `response.done`; a function the reply calls is
an output item of its own, and its output a conversation item. Assistant items are `item_` + the
response id's suffix; `conversation.item.truncate` cuts a reply's history back to what the client
played.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from config import ServerConfig
from realtime.echo import EchoCanceller
from realtime.events import (
    ClientEvent,
    ConversationItemCreate,
    ConversationItemCreated,
    ConversationItemDelete,
    ConversationItemDeleted,
    ConversationItemRetrieve,
    ConversationItemRetrieved,
    ConversationItemTruncate,
    ConversationItemTruncated,
    Error,
    EventError,
    FunctionCallArgumentsDone,
    InputAudioBufferClear,
    InputAudioBufferCleared,
    InputAudioBufferCommit,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    ServerEvent,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TimeoutTriggered,
    TranscriptionCompleted,
    TranscriptionDelta,
)
from realtime.openai_session import RATE, RealtimeSession
from realtime.output import FrameClock
from realtime.session import AgentFactory, SessionRegistry
from realtime.wire import SessionStart
from realtime.ws import WebSocketSession, hold, prepare_socket
from runtime.audio import FRAME_MS

DELTA_FRAMES = 5  # 100 ms of reply audio per response.output_audio.delta
STATUS = {"completed": "completed", "interrupted": "cancelled", "cancelled": "cancelled"}
CANCEL_REASON = {"interrupted": "turn_detected", "cancelled": "client_cancelled"}
ITEM = "realtime.item"


def _event_id() -> str:
    return "event_" + uuid.uuid4().hex[:16]


def ga_item_id(ours: str) -> str:
    """An assistant item is named after its reply (`resp_X` -> `item_X`); others keep their id."""
    return "item_" + ours.removeprefix("resp_") if ours.startswith("resp_") and "-" not in ours else ours


@dataclass(frozen=True)
class AudioAppend:
    """`input_audio_buffer.append`: PCM16 for the input, not an event of ours."""

    pcm: bytes

    @classmethod
    def parse(cls, message: dict[str, Any]) -> AudioAppend:
        try:
            pcm = base64.b64decode(message.get("audio", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise EventError("invalid_value", "audio must be base64 PCM16") from None
        if len(pcm) % 2:
            raise EventError("invalid_audio", "audio must be whole PCM16 samples (even length)")
        return cls(pcm)


@dataclass
class _Response:
    """What the translation keeps of one reply while it runs: its message item, its function-call
    items, how it speaks (audio or text only), whether it is in the conversation."""

    id: str
    text_only: bool
    out_of_band: bool
    metadata: dict[str, str] | None
    previous_item_id: str | None = None  # the item before its message in the conversation
    calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def item_id(self) -> str:
        return ga_item_id(self.id)

    def part(self) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item_id, "output_index": 0, "content_index": 0}

    def message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text} if self.text_only else {"type": "output_audio", "transcript": text}]
        return {"id": self.item_id, "object": ITEM, "type": "message", "role": "assistant", "status": status, "content": content}

    def content_part(self, text: str) -> dict[str, Any]:
        return {"type": "text", "text": text} if self.text_only else {"type": "audio", "transcript": text}

    def body(self, status: str, output: list[dict[str, Any]], conversation: str | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.response",
            "status": status,
            "output": output,
            "conversation_id": None if self.out_of_band else conversation,
            "output_modalities": ["text" if self.text_only else "audio"],
            "metadata": self.metadata,
        }


class Translator:
    """One connection's mapping between our events and OpenAI Realtime's. Owns what the mapping
    needs to remember: the GA session, the replies under way, the items announced (for
    `previous_item_id` and the assistant items' ids), the user transcript already sent as deltas."""

    def __init__(self, model: str) -> None:
        self.session = RealtimeSession(model)
        self.conversation = "conv_" + uuid.uuid4().hex[:16]
        self.response_id: str | None = None  # the reply whose audio is going out
        self._responses: dict[str, _Response] = {}
        self._assistant_items: dict[str, str] = {}  # GA item id -> our response id
        self._transcripts: dict[str, str] = {}  # the user transcript sent so far, per item
        self._speech_ms: dict[str, int] = {}  # where each user item's speech started
        self._seconds: dict[str, float] = {}  # each committed user item's length
        self._last_item: str | None = None

    @property
    def text_only(self) -> bool:
        return self.session.text_only

    def server(self, event: ServerEvent) -> list[dict[str, Any]]:
        """Our event as the OpenAI events that say the same (none for ours alone: state, metrics)."""
        match event:
            case SessionCreated():
                return [{"type": event.type, "session": self.session.echo(event.session)}]
            case SessionUpdated():
                self.session.applied()
                return [{"type": event.type, "session": self.session.echo(event.session)}]
            case SpeechStarted():
                self._speech_ms[event.item_id] = event.audio_start_ms
                return [{"type": event.type, "item_id": event.item_id, "audio_start_ms": event.audio_start_ms}]
            case SpeechStopped():
                return self._committed(event)
            case TranscriptionDelta():
                return self._transcription_delta(event)
            case TranscriptionCompleted():
                self._transcripts.pop(event.item_id, None)
                usage = {"type": "duration", "seconds": self._seconds.pop(event.item_id, 0.0)}
                return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "transcript": event.transcript, "usage": usage}]
            case ResponseCreated():
                return self._response_created(event)
            case ResponseTextDelta() if (response := self._responses.get(event.response_id)) is not None:
                kind = "response.output_text.delta" if response.text_only else "response.output_audio_transcript.delta"
                return [{**response.part(), "type": kind, "delta": event.delta}]
            case ResponseDone() if event.response_id in self._responses:
                return self._response_done(event)
            case FunctionCallArgumentsDone() if (response := self._responses.get(event.response_id)) is not None:
                return self._function_call(response, event)
            case ConversationItemCreated():
                return self._item_added(self._ga_item(event.item))
            case ConversationItemRetrieved():
                return [{"type": event.type, "item": self._ga_item(event.item)}]
            case ConversationItemDeleted():
                return [{"type": event.type, "item_id": ga_item_id(event.item_id)}]
            case ConversationItemTruncated():
                return [{"type": event.type, "item_id": ga_item_id(event.item_id), "content_index": 0, "audio_end_ms": round(event.audio_end_ms)}]
            case InputAudioBufferCleared():
                return [{"type": event.type}]
            case TimeoutTriggered():
                return [{"type": event.type, "item_id": event.item_id, "audio_start_ms": event.audio_start_ms, "audio_end_ms": event.audio_end_ms}]
            case Error():
                error = {"type": "invalid_request_error", "code": event.code, "message": event.message, "param": None, "event_id": event.event_id}
                return [{"type": "error", "error": error}]
        return []

    def _committed(self, event: SpeechStopped) -> list[dict[str, Any]]:
        start = self._speech_ms.pop(event.item_id, event.audio_end_ms)
        self._seconds[event.item_id] = max(0, event.audio_end_ms - start) / 1000
        committed = {"type": "input_audio_buffer.committed", "item_id": event.item_id, "previous_item_id": self._last_item}
        item = {"id": event.item_id, "object": ITEM, "type": "message", "role": "user", "status": "completed",
                "content": [{"type": "input_audio", "transcript": None}]}
        return [{"type": event.type, "item_id": event.item_id, "audio_end_ms": event.audio_end_ms}, committed, *self._item_added(item)]

    def _item_added(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """An item joined the conversation, whole: `conversation.item.added` then `.done`."""
        previous, self._last_item = self._last_item, item["id"]
        return [{"type": f"conversation.item.{step}", "previous_item_id": previous, "item": item} for step in ("added", "done")]

    def _transcription_delta(self, event: TranscriptionDelta) -> list[dict[str, Any]]:
        sent = self._transcripts.get(event.item_id, "")
        if not event.transcript.startswith(sent) or event.transcript == sent:
            return []  # ours replace the text so far; theirs only append
        self._transcripts[event.item_id] = event.transcript
        delta = event.transcript[len(sent) :]
        return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "delta": delta}]

    def _response_created(self, event: ResponseCreated) -> list[dict[str, Any]]:
        order = event.order
        response = _Response(
            event.response_id,
            self.text_only or (order is not None and order.text_only),
            order is not None and order.out_of_band,
            order.metadata if order is not None else None,
        )
        self._responses[response.id] = response
        self._assistant_items[response.item_id] = response.id
        self.response_id = None if response.text_only else response.id
        item = response.message("in_progress", None)
        messages = [
            {"type": "response.created", "response": response.body("in_progress", [], self.conversation)},
            {"type": "response.output_item.added", "response_id": response.id, "output_index": 0, "item": item},
        ]
        if not response.out_of_band:
            response.previous_item_id, self._last_item = self._last_item, item["id"]
            messages.append({"type": "conversation.item.added", "previous_item_id": response.previous_item_id, "item": item})
        messages.append({**response.part(), "type": "response.content_part.added", "part": response.content_part("")})
        return messages

    def _function_call(self, response: _Response, event: FunctionCallArgumentsDone) -> list[dict[str, Any]]:
        index = len(response.calls) + 1  # the message is output 0
        call = {"id": event.item_id, "object": ITEM, "type": "function_call", "call_id": event.call_id, "name": event.name}
        done = {**call, "status": "completed", "arguments": event.arguments}
        response.calls.append(done)
        where = {"response_id": response.id, "item_id": event.item_id, "output_index": index, "call_id": event.call_id}
        messages = [{"type": "response.output_item.added", "response_id": response.id, "output_index": index, "item": {**call, "status": "in_progress", "arguments": ""}}]
        messages.append({"type": "response.function_call_arguments.delta", **where, "delta": event.arguments})
        messages.append({"type": "response.function_call_arguments.done", **where, "name": event.name, "arguments": event.arguments})
        messages.append({"type": "response.output_item.done", "response_id": response.id, "output_index": index, "item": done})
        return messages if response.out_of_band else [*messages, *self._item_added(done)[1:]]

    def _response_done(self, event: ResponseDone) -> list[dict[str, Any]]:
        response = self._responses.pop(event.response_id)
        if self.response_id == event.response_id:
            self.response_id = None
        part, text = response.part(), event.output_text
        status = "completed" if event.status == "completed" else "incomplete"
        item = response.message(status, text)
        if response.text_only:
            messages = [{**part, "type": "response.output_text.done", "text": text}]
        else:
            messages = [{**part, "type": "response.output_audio.done"}, {**part, "type": "response.output_audio_transcript.done", "transcript": text}]
        messages.append({**part, "type": "response.content_part.done", "part": response.content_part(text)})
        messages.append({"type": "response.output_item.done", "response_id": response.id, "output_index": 0, "item": item})
        if not response.out_of_band:
            messages.append({"type": "conversation.item.done", "previous_item_id": response.previous_item_id, "item": item})
        body = response.body(STATUS.get(event.status, "failed"), [item, *response.calls], self.conversation)
        if event.status in CANCEL_REASON:
            body["status_details"] = {"type": "cancelled", "reason": CANCEL_REASON[event.status]}
        return [*messages, {"type": "response.done", "response": body}]

    def _ga_item(self, ours: dict[str, Any]) -> dict[str, Any]:
        """Our item (`Item.to_dict()`) as a GA conversation item."""
        item = {**ours, "id": ga_item_id(ours["id"]), "object": ITEM}
        if item["type"] != "message":
            return {**item, "status": "completed"}
        if item["role"] == "assistant" and not self.text_only:
            item["content"] = [{"type": "output_audio", "transcript": part["text"]} for part in item["content"]]
        return item

    def audio(self, pcm: bytes) -> dict[str, Any] | None:
        response = self._responses.get(self.response_id) if self.response_id is not None else None
        if response is None:
            return None
        return {**response.part(), "type": "response.output_audio.delta", "delta": base64.b64encode(pcm).decode()}

    def _our_item_id(self, message: dict[str, Any]) -> dict[str, Any]:
        item_id = message.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise EventError("invalid_value", "item_id must name an item of this session")
        return {**message, "item_id": self._assistant_items.get(item_id, item_id)}

    def client(self, text: str | bytes) -> ClientEvent | AudioAppend | None:
        """One client message as our event, audio to append, or None (one that needs nothing)."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise EventError("invalid_json", f"message is not valid JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise EventError("invalid_event", "message must be a JSON object with a string 'type'")
        event_id = message.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        match message["type"]:
            case "input_audio_buffer.append":
                return AudioAppend.parse(message)
            case "session.update":
                return SessionUpdate(self.session.update(message.get("session")), event_id)
            case "conversation.item.create":
                return ConversationItemCreate.parse(message, event_id, respond=False)
            case "conversation.item.retrieve":
                return ConversationItemRetrieve.parse(self._our_item_id(message), event_id)
            case "conversation.item.delete":
                return ConversationItemDelete.parse(self._our_item_id(message), event_id)
            case "conversation.item.truncate":
                return ConversationItemTruncate.parse(self._our_item_id(message), event_id)
            case "response.create":
                return ResponseCreate.parse(message, event_id)
            case "response.cancel":
                return ResponseCancel(event_id)
            case "input_audio_buffer.commit":
                return InputAudioBufferCommit(event_id)
            case "input_audio_buffer.clear":
                return InputAudioBufferClear(event_id)
            case kind:
                raise EventError("unknown_event", f"unknown event type {kind!r}")


class OpenAIRealtimeSession(WebSocketSession):
    """A Session carried by one `/v1/realtime` WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, transport: Any, send_queue_s: float, model: str, echo: EchoCanceller) -> None:
        self._translator = Translator(model)
        self._pending_audio: list[bytes] = []
        start = SessionStart(RATE, RATE)
        super().__init__(ws, transport, start, send_queue_s, echo, name="openai-realtime", defaults=self._translator.session.initial())

    def _encode(self, event: ServerEvent) -> list[str]:
        audio = self._audio_delta() if isinstance(event, ResponseDone) else []  # the reply's last audio before its end
        return audio + [json.dumps({"event_id": _event_id(), **message}) for message in self._translator.server(event)]

    def _audio_delta(self) -> list[str]:
        """The reply audio gathered since the last delta, as one `response.output_audio.delta`."""
        message = self._translator.audio(b"".join(self._pending_audio))
        self._pending_audio.clear()
        return [] if message is None else [json.dumps({"event_id": _event_id(), **message})]

    def parse_message(self, message: str | bytes) -> ClientEvent | None:
        event = self._translator.client(message)
        if isinstance(event, AudioAppend):
            self.on_audio(event.pcm)
            return None
        return event

    def on_binary(self, data: bytes) -> None:
        self.reject("invalid_event", "send audio as input_audio_buffer.append (base64 in JSON), not binary")

    async def _pace_audio(self) -> None:
        """Send the reply's audio as it plays out, 100 ms a delta; silence between replies is not sent."""
        clock = FrameClock(FRAME_MS / 1000)
        while True:
            await clock.tick()
            before = self.output.audio_frames_sent
            frame = self.output.next_frame()
            if self.output.audio_frames_sent > before:
                self._pending_audio.append(frame.astype("<i2").tobytes())
            if self._pending_audio and (len(self._pending_audio) >= DELTA_FRAMES or self.output.audio_frames_sent == before):
                for message in self._audio_delta():
                    self._send(message)


async def serve_openai_realtime(
    request: web.Request, config: ServerConfig, registry: SessionRegistry, factory: AgentFactory
) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=config.ping_timeout_s, max_msg_size=config.max_body_bytes * 4)
    await ws.prepare(request)
    model = request.query.get("model", "default")
    # The protocol has no word for the client's own echo canceller: only `--echo-cancel on` cancels.
    session = OpenAIRealtimeSession(ws, prepare_socket(request), config.ws_send_queue_s, model, EchoCanceller(config.echo_cancel))
    await hold(ws, session, registry, factory)
    return ws
