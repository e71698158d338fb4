"""`/v1/realtime`: the OpenAI Realtime API (GA event names) over a WebSocket, so that clients written
for it (the official SDKs among them) talk to this server. A transport only: it translates messages
both ways, and the Controller decides everything as on any other transport.

Audio is base64 PCM16 mono at 24 kHz both ways. `server_vad` maps to our `vad` turn detection,
`semantic_vad` to `semantic`, and `null` to `manual` (the client commits each turn). Replies start
at the end of a turn and after a typed message, so `response.create` starts nothing of its own.
`conversation.item.truncate` cuts a reply's history back to what the client played.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from config import ServerConfig
from realtime.events import (
    ClientEvent,
    ConversationItemCreate,
    ConversationItemCreated,
    ConversationItemTruncate,
    ConversationItemTruncated,
    Error,
    EventError,
    FunctionCallArgumentsDone,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    ResponseCancel,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    ServerEvent,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
)
from realtime.echo import EchoCanceller
from realtime.output import FrameClock
from realtime.session import AgentFactory, SessionRegistry
from realtime.wire import SessionStart
from realtime.ws import WebSocketSession, hold, prepare_socket
from runtime.audio import FRAME_MS

RATE = 24000
AUDIO_FORMAT = {"type": "audio/pcm", "rate": RATE}
DELTA_FRAMES = 5  # 100 ms of reply audio per response.output_audio.delta
STATUS = {"completed": "completed", "interrupted": "cancelled", "cancelled": "cancelled"}


def _event_id() -> str:
    return "event_" + uuid.uuid4().hex[:16]


def turn_detection_to_ours(detection: Any) -> dict[str, Any]:
    """An OpenAI `turn_detection` object as our `session.update` turn_detection, or EventError."""
    if detection is None:
        return {"type": "manual"}
    if not isinstance(detection, dict):
        raise EventError("invalid_value", "turn_detection must be an object")
    kind = detection.get("type", "server_vad")
    if kind == "server_vad":
        ours: dict[str, Any] = {"type": "vad"}
        for theirs, mine in (("threshold", "threshold"), ("prefix_padding_ms", "prefix_padding_ms"), ("silence_duration_ms", "commit_ms")):
            if theirs in detection:
                ours[mine] = detection[theirs]
        return ours
    if kind == "semantic_vad":
        eagerness = detection.get("eagerness", "auto")
        return {"type": "semantic", "eagerness": "medium" if eagerness == "auto" else eagerness}
    raise EventError("invalid_value", f"unknown turn_detection type {kind!r}: server_vad or semantic_vad")


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


class Translator:
    """One connection's mapping between our events and OpenAI Realtime's. Owns what the mapping
    needs to remember: the reply being spoken, the transcript already sent as deltas."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.response_id: str | None = None  # the reply whose audio is going out
        self.text_only = False  # output_modalities ["text"]: the reply's words, no audio
        self._transcripts: dict[str, str] = {}  # the user transcript sent so far, per item
        self._previous_item: str | None = None

    def session(self, ours: dict[str, Any]) -> dict[str, Any]:
        detection = ours.get("turn_detection", {})
        theirs: dict[str, Any] | None = {"type": "server_vad", "silence_duration_ms": detection.get("commit_ms")}
        if detection.get("type") == "semantic":
            theirs = {"type": "semantic_vad", "eagerness": detection.get("eagerness")}
        elif detection.get("type") == "manual":
            theirs = None
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": ours.get("id"),
            "model": self.model,
            "output_modalities": ["text" if self.text_only else "audio"],
            "audio": {
                "input": {"format": AUDIO_FORMAT, "turn_detection": theirs},
                "output": {"format": AUDIO_FORMAT, "voice": ours.get("profile")},
            },
        }

    def server(self, event: ServerEvent) -> list[dict[str, Any]]:
        """Our event as the OpenAI events that say the same (none for ours alone: state, metrics)."""
        match event:
            case SessionCreated() | SessionUpdated():
                return [{"type": event.type, "session": self.session(event.session)}]
            case SpeechStarted():
                return [{"type": event.type, "item_id": event.item_id, "audio_start_ms": event.audio_start_ms}]
            case SpeechStopped():
                previous, self._previous_item = self._previous_item, event.item_id
                return [
                    {"type": event.type, "item_id": event.item_id, "audio_end_ms": event.audio_end_ms},
                    {"type": "input_audio_buffer.committed", "item_id": event.item_id, "previous_item_id": previous},
                ]
            case TranscriptionDelta():
                return self._transcription_delta(event)
            case TranscriptionCompleted():
                self._transcripts.pop(event.item_id, None)
                return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "transcript": event.transcript}]
            case ResponseCreated():
                self.response_id = event.response_id
                return [{"type": event.type, "response": self._response(event.response_id, "in_progress", [])}]
            case ResponseTextDelta():
                kind = "response.output_text.delta" if self.text_only else "response.output_audio_transcript.delta"
                return [{**self._part(event.response_id), "type": kind, "delta": event.delta}]
            case ResponseDone():
                return self._response_done(event)
            case FunctionCallArgumentsDone():
                call = {"response_id": event.response_id, "item_id": event.item_id, "output_index": 0, "call_id": event.call_id}
                return [{"type": event.type, **call, "name": event.name, "arguments": event.arguments}]
            case ConversationItemCreated():
                return [{"type": event.type, "item": {"object": "realtime.item", "status": "completed", **event.item}}]
            case ConversationItemTruncated():
                item = self.item_id(event.item_id)
                return [{"type": event.type, "item_id": item, "content_index": 0, "audio_end_ms": round(event.audio_end_ms)}]
            case Error():
                error = {"type": "invalid_request_error", "code": event.code, "message": event.message, "event_id": event.event_id}
                return [{"type": "error", "error": error}]
        return []

    def _transcription_delta(self, event: TranscriptionDelta) -> list[dict[str, Any]]:
        sent = self._transcripts.get(event.item_id, "")
        if not event.transcript.startswith(sent) or event.transcript == sent:
            return []  # ours replace the text so far; theirs only append
        self._transcripts[event.item_id] = event.transcript
        delta = event.transcript[len(sent) :]
        return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "delta": delta}]

    def _response_done(self, event: ResponseDone) -> list[dict[str, Any]]:
        if self.response_id == event.response_id:
            self.response_id = None
        item = {
            "id": self.item_id(event.response_id),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "completed" if event.status == "completed" else "incomplete",
            "content": [
                {"type": "output_text", "text": event.output_text}
                if self.text_only
                else {"type": "output_audio", "transcript": event.output_text}
            ],
        }
        part = self._part(event.response_id)
        done = (
            [{**part, "type": "response.output_text.done", "text": event.output_text}]
            if self.text_only
            else [
                {**part, "type": "response.output_audio.done"},
                {**part, "type": "response.output_audio_transcript.done", "transcript": event.output_text},
            ]
        )
        status = STATUS.get(event.status, "failed")
        return [*done, {"type": event.type, "response": self._response(event.response_id, status, [item])}]

    def audio(self, pcm: bytes) -> dict[str, Any] | None:
        if self.response_id is None or self.text_only:
            return None
        return {**self._part(self.response_id), "type": "response.output_audio.delta", "delta": base64.b64encode(pcm).decode()}

    @staticmethod
    def item_id(response_id: str) -> str:
        return "item_" + response_id.removeprefix("resp_")

    def _part(self, response_id: str) -> dict[str, Any]:
        return {"response_id": response_id, "item_id": self.item_id(response_id), "output_index": 0, "content_index": 0}

    @staticmethod
    def _response(response_id: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": response_id, "object": "realtime.response", "status": status, "output": output}

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
                return self._session_update(message, event_id)
            case "conversation.item.create":
                return ConversationItemCreate.parse(message, event_id)
            case "response.cancel":
                return ResponseCancel(event_id)
            case "input_audio_buffer.commit":
                return InputAudioBufferCommit(event_id)
            case "input_audio_buffer.clear":
                return InputAudioBufferClear(event_id)
            case "response.create":
                return None
            case "conversation.item.truncate":
                item_id = message.get("item_id")
                if not isinstance(item_id, str) or not item_id.startswith("item_"):
                    raise EventError("invalid_value", "item_id must name an assistant item of this session")
                ours = {**message, "item_id": "resp_" + item_id.removeprefix("item_")}
                return ConversationItemTruncate.parse(ours, event_id)
            case kind:
                raise EventError("unknown_event", f"unknown event type {kind!r}")

    def _session_update(self, message: dict[str, Any], event_id: str | None) -> SessionUpdate:
        session = message.get("session")
        if not isinstance(session, dict):
            raise EventError("invalid_value", "session.update needs a 'session' object")
        modalities = session.get("output_modalities")
        if modalities is not None:
            if modalities not in (["audio"], ["text"]):
                raise EventError("invalid_value", "output_modalities must be ['audio'] or ['text']")
            self.text_only = modalities == ["text"]
        audio_in = session.get("audio", {}).get("input", {}) if isinstance(session.get("audio"), dict) else {}
        if isinstance(audio_in, dict) and "turn_detection" in audio_in:
            return SessionUpdate({"turn_detection": turn_detection_to_ours(audio_in["turn_detection"])}, event_id)
        return SessionUpdate({}, event_id)


class OpenAIRealtimeSession(WebSocketSession):
    """A Session carried by one `/v1/realtime` WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, transport: Any, send_queue_s: float, model: str, echo: EchoCanceller) -> None:
        self._translator = Translator(model)
        self._pending_audio: list[bytes] = []
        super().__init__(ws, transport, SessionStart(RATE, RATE), send_queue_s, echo, name="openai-realtime")

    def _encode(self, event: ServerEvent) -> list[str]:
        return [json.dumps({"event_id": _event_id(), **message}) for message in self._translator.server(event)]

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
                message = self._translator.audio(b"".join(self._pending_audio))
                self._pending_audio.clear()
                if message is not None:
                    self._send(json.dumps({"event_id": _event_id(), **message}))


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
