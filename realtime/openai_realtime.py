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
from typing import Any

from aiohttp import web

from config import ServerConfig
from realtime.events import (
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
    SessionStart,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
)
from realtime.output import FrameClock
from realtime.session import AgentFactory, SessionRegistry
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
        if isinstance(event, (SessionCreated, SessionUpdated)):
            return [{"type": event.type, "session": self.session(event.session)}]
        if isinstance(event, SpeechStarted):
            return [{"type": event.type, "item_id": event.item_id, "audio_start_ms": event.audio_start_ms}]
        if isinstance(event, SpeechStopped):
            previous, self._previous_item = self._previous_item, event.item_id
            return [
                {"type": event.type, "item_id": event.item_id, "audio_end_ms": event.audio_end_ms},
                {"type": "input_audio_buffer.committed", "item_id": event.item_id, "previous_item_id": previous},
            ]
        if isinstance(event, TranscriptionDelta):
            sent = self._transcripts.get(event.item_id, "")
            if not event.transcript.startswith(sent) or event.transcript == sent:
                return []  # ours replace the text so far; theirs only append
            self._transcripts[event.item_id] = event.transcript
            delta = event.transcript[len(sent) :]
            return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "delta": delta}]
        if isinstance(event, TranscriptionCompleted):
            self._transcripts.pop(event.item_id, None)
            return [{"type": event.type, "item_id": event.item_id, "content_index": 0, "transcript": event.transcript}]
        if isinstance(event, ResponseCreated):
            self.response_id = event.response_id
            return [{"type": event.type, "response": self._response(event.response_id, "in_progress", [])}]
        if isinstance(event, ResponseTextDelta):
            kind = "response.output_text.delta" if self.text_only else "response.output_audio_transcript.delta"
            return [{**self._part(event.response_id), "type": kind, "delta": event.delta}]
        if isinstance(event, ResponseDone):
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
            status = STATUS.get(event.status, "failed")
            part = self._part(event.response_id)
            done = (
                [{**part, "type": "response.output_text.done", "text": event.output_text}]
                if self.text_only
                else [
                    {**part, "type": "response.output_audio.done"},
                    {**part, "type": "response.output_audio_transcript.done", "transcript": event.output_text},
                ]
            )
            return [*done, {"type": event.type, "response": self._response(event.response_id, status, [item])}]
        if isinstance(event, FunctionCallArgumentsDone):
            call = {"response_id": event.response_id, "item_id": event.item_id, "output_index": 0, "call_id": event.call_id}
            return [{"type": event.type, **call, "name": event.name, "arguments": event.arguments}]
        if isinstance(event, ConversationItemCreated):
            return [{"type": event.type, "item": {"object": "realtime.item", "status": "completed", **event.item}}]
        if isinstance(event, ConversationItemTruncated):
            item = self.item_id(event.item_id)
            return [{"type": event.type, "item_id": item, "content_index": 0, "audio_end_ms": round(event.audio_end_ms)}]
        if isinstance(event, Error):
            error = {"type": "invalid_request_error", "code": event.code, "message": event.message, "event_id": event.event_id}
            return [{"type": "error", "error": error}]
        return []

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

    def client(self, text: str) -> tuple[str, Any]:
        """One client message: ("audio", PCM16 bytes), ("event", our ClientEvent) or ("none", None)."""
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise EventError("invalid_json", f"message is not valid JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise EventError("invalid_event", "message must be a JSON object with a string 'type'")
        kind, event_id = message["type"], message.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        if kind == "input_audio_buffer.append":
            try:
                pcm = base64.b64decode(message.get("audio", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise EventError("invalid_value", "audio must be base64 PCM16") from None
            if len(pcm) % 2:
                raise EventError("invalid_audio", "audio must be whole PCM16 samples (even length)")
            return "audio", pcm
        if kind == "session.update":
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
                return "event", SessionUpdate({"turn_detection": turn_detection_to_ours(audio_in["turn_detection"])}, event_id)
            return "event", SessionUpdate({}, event_id)
        if kind == "conversation.item.create":
            return "event", ConversationItemCreate.parse(message, event_id)
        if kind == "response.cancel":
            return "event", ResponseCancel(event_id)
        if kind == "input_audio_buffer.commit":
            return "event", InputAudioBufferCommit(event_id)
        if kind == "input_audio_buffer.clear":
            return "event", InputAudioBufferClear(event_id)
        if kind == "response.create":
            return "none", None
        if kind == "conversation.item.truncate":
            item_id = message.get("item_id")
            if not isinstance(item_id, str) or not item_id.startswith("item_"):
                raise EventError("invalid_value", "item_id must name an assistant item of this session")
            ours = {**message, "item_id": "resp_" + item_id.removeprefix("item_")}
            return "event", ConversationItemTruncate.parse(ours, event_id)
        raise EventError("unknown_event", f"unknown event type {kind!r}")


class OpenAIRealtimeSession(WebSocketSession):
    """A Session carried by one `/v1/realtime` WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, transport: Any, send_queue_s: float, model: str) -> None:
        self._translator = Translator(model)
        self._pending_audio: list[bytes] = []
        super().__init__(ws, transport, SessionStart(RATE, RATE), send_queue_s, name="openai-realtime")

    def _encode(self, event: ServerEvent) -> list[str]:
        return [json.dumps({"event_id": _event_id(), **message}) for message in self._translator.server(event)]

    def on_text(self, text: str) -> None:
        try:
            kind, value = self._translator.client(text)
        except EventError as exc:
            self._reject(exc.code, exc.message)
            return
        if kind == "audio":
            self.on_audio(value)
        elif kind == "event" and self.agent is not None:
            self.agent.on_client_event(value)

    def on_binary(self, data: bytes) -> None:
        self._reject("invalid_event", "send audio as input_audio_buffer.append (base64 in JSON), not binary")

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
    await hold(ws, OpenAIRealtimeSession(ws, prepare_socket(request), config.ws_send_queue_s, model), registry, factory)
    return ws
