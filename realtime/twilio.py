"""Phone callers through Twilio Media Streams.

Twilio asks `POST /twilio/voice` what to do with a call; the answer (TwiML) connects it to a
bidirectional stream, a WebSocket to `/twilio/media` on which Twilio speaks its own messages:
`connected`, `start` (the stream's id and format), `media` (base64 mu-law at 8 kHz, 20 ms each),
`mark` (a name we sent, returned once the audio sent before it has played), `dtmf`, `stop`. We send
`media` (the reply, 20 ms a message, as it plays out), a `mark` after each 100 ms of it (so what
the caller heard comes from the phone's own playout, as `playback.position` does on the page) and `clear`
(Twilio drops what it has not played yet) when a reply is cut off. Every request is
checked against its `X-Twilio-Signature` with the account's auth token (`--twilio-auth-token`);
without one the routes are off.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from xml.sax.saxutils import quoteattr

import structlog
from aiohttp import web
from twilio.request_validator import RequestValidator

from config import ServerConfig
from realtime.echo import EchoCanceller
from realtime.events import ClientEvent, EventError, ResponseDone, ServerEvent
from realtime.output import FrameClock
from realtime.session import AgentFactory, SessionLimitReached, SessionRegistry
from realtime.wire import SessionStart
from realtime.ws import WebSocketSession, hold, prepare_socket
from runtime.audio import FRAME_MS
from runtime.g711 import int16_to_ulaw, ulaw_to_int16

RATE = 8000
MARK_FRAMES = 5  # a mark after each 100 ms of reply audio
MEDIA_PATH = "/twilio/media/{call_sid}"  # the call's own stream: its session is named after it
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
log = structlog.get_logger()


def public_url(request: web.Request, path_qs: str | None = None, websocket: bool = False) -> str:
    """The URL Twilio used (and signed): its scheme as a proxy in front says it was."""
    scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
    if websocket:
        scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    host = request.headers.get("X-Forwarded-Host", request.host)
    return f"{scheme}://{host}{request.path_qs if path_qs is None else path_qs}"


def signed(request: web.Request, token: str, params: dict[str, str], websocket: bool = False) -> bool:
    """Whether the request carries Twilio's signature of its URL and parameters, by `token`."""
    signature = request.headers.get("X-Twilio-Signature", "")
    return bool(signature) and RequestValidator(token).validate(public_url(request, websocket=websocket), params, signature)


def session_id(call_sid: str) -> str:
    """A phone call's session is `sess_` + its CallSid: its transcript and recording are found by it."""
    return "sess_" + call_sid


def twiml_connect(stream_url: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={quoteattr(stream_url)} /></Connect></Response>'


BUSY = '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy" /></Response>'


class TwilioSession(WebSocketSession):
    """A Session carried by one Twilio media stream: mu-law at 8 kHz both ways, Twilio's messages
    for everything else. Owns the stream's id and what the marks it sent stand for."""

    def __init__(self, ws: web.WebSocketResponse, transport: Any, send_queue_s: float, echo: EchoCanceller, call_sid: str) -> None:
        super().__init__(ws, transport, SessionStart(RATE, RATE), send_queue_s, echo, name="twilio", session_id=session_id(call_sid))
        self.stream_sid: str | None = None
        self.call_sid = call_sid
        self.marks_returned = 0
        self.dtmf: list[str] = []
        self._cleared_for: str | None = None  # the reply whose unplayed audio was cleared

    def _encode(self, event: ServerEvent) -> list[str]:
        """Our events mean nothing to Twilio but one thing: a reply cut off, whose audio Twilio still
        holds must not play. (A pause is not cleared: what Twilio holds is under 100 ms more, and
        a reply that resumes would lose it.)"""
        if not isinstance(event, ResponseDone) or event.status == "completed" or self.stream_sid is None:
            return []
        self._cleared_for = event.response_id
        return [json.dumps({"event": "clear", "streamSid": self.stream_sid})]

    def parse_message(self, message: str | bytes) -> ClientEvent | None:
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):
            raise EventError("invalid_json", "Twilio messages are JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            raise EventError("invalid_event", "a Twilio message needs an 'event'")
        match msg["event"]:
            case "connected":
                pass
            case "start":
                start = msg.get("start") if isinstance(msg.get("start"), dict) else {}
                self.stream_sid = msg.get("streamSid") or start.get("streamSid")
                fmt = start.get("mediaFormat", {})
                if fmt and (fmt.get("encoding"), fmt.get("sampleRate")) != ("audio/x-mulaw", RATE):
                    raise EventError("unsupported", f"media format {fmt}: only audio/x-mulaw at {RATE} Hz")
                self.log.info("twilio.stream_started", stream_sid=self.stream_sid, call_sid=self.call_sid)
            case "media":
                self._media(msg.get("media"))
            case "mark":
                self._mark_returned(msg.get("mark"))
            case "dtmf":
                digit = (msg.get("dtmf") or {}).get("digit")
                self.dtmf.append(str(digit))
                self.log.info("twilio.dtmf", digit=digit)
            case "stop":
                self.request_close("hangup")
            case kind:
                raise EventError("unknown_event", f"unknown Twilio event {kind!r}")
        return None

    def _media(self, media: Any) -> None:
        if not isinstance(media, dict) or media.get("track", "inbound") != "inbound":
            return
        try:
            ulaw = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise EventError("invalid_value", "media.payload must be base64 mu-law") from None
        self.on_audio(ulaw_to_int16(ulaw).tobytes())

    def _mark_returned(self, mark: Any) -> None:
        """A mark comes back once the audio before it has played: the reply's position, as heard."""
        name = mark.get("name") if isinstance(mark, dict) else None
        response_id, _, position = str(name).rpartition(":")
        if not response_id or response_id == self._cleared_for or not position.isdigit():
            return  # a cleared reply's marks come back at once, unplayed
        self.marks_returned += 1
        self.io().playback.report(float(position), response_id)

    def on_binary(self, data: bytes) -> None:
        self.reject("invalid_event", "Twilio sends JSON text")

    async def _pace_audio(self) -> None:
        """The reply's audio as it plays out, 20 ms a media message (as Twilio sends its own), a
        mark after every 100 ms of it and at its end."""
        clock = FrameClock(FRAME_MS / 1000)
        playback = self.io().playback
        unmarked = 0
        while True:
            await clock.tick()
            before = self.output.audio_frames_sent
            frame = self.output.next_frame()
            audio = self.output.audio_frames_sent > before
            if self.stream_sid is None:
                continue
            if audio:
                payload = base64.b64encode(int16_to_ulaw(frame)).decode()
                self._send(json.dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}}))
                unmarked += 1
            if unmarked and (unmarked >= MARK_FRAMES or not audio) and playback.response_id is not None:
                mark = f"{playback.response_id}:{round(playback.sent_ms)}"
                self._send(json.dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": mark}}))
                unmarked = 0


class TwilioRoutes:
    """`POST /twilio/voice` and `GET /twilio/media`, both checked against Twilio's signature."""

    def __init__(self, config: ServerConfig, registry: SessionRegistry, factory: AgentFactory) -> None:
        self.config, self.registry, self.factory = config, registry, factory

    def _token(self) -> str:
        if self.config.twilio_auth_token is None:
            raise web.HTTPNotFound(text=json.dumps({"error": {"code": "not_found", "message": "phone calls are off: --twilio-auth-token"}}),
                                   content_type="application/json")
        return self.config.twilio_auth_token

    async def voice(self, request: web.Request) -> web.Response:
        token = self._token()
        params = {k: str(v) for k, v in (await request.post()).items()}
        if not signed(request, token, params):
            log.info("twilio.refused", path=request.path, reason="bad_signature")
            return web.json_response({"error": {"code": "bad_signature", "message": "not signed by Twilio"}}, status=403)
        try:
            self.registry.check_capacity()
        except SessionLimitReached:
            return web.Response(text=BUSY, content_type="text/xml")
        call_sid = params.get("CallSid", "")
        if not CALL_SID.fullmatch(call_sid):
            return web.json_response({"error": {"code": "invalid_call_sid", "message": "CallSid must be CA and 32 hex digits"}}, status=400)
        stream = public_url(request, MEDIA_PATH.format(call_sid=call_sid), websocket=True)
        log.info("twilio.call", call_sid=call_sid, caller=params.get("From"), session_id=session_id(call_sid))
        return web.Response(text=twiml_connect(stream), content_type="text/xml")

    async def media(self, request: web.Request) -> web.StreamResponse:
        token = self._token()
        if not signed(request, token, {}, websocket=True):
            log.info("twilio.refused", path=request.path, reason="bad_signature")
            return web.json_response({"error": {"code": "bad_signature", "message": "not signed by Twilio"}}, status=403)
        call_sid = request.match_info["call_sid"]
        if not CALL_SID.fullmatch(call_sid) or self.registry.get(session_id(call_sid)) is not None:
            return web.json_response({"error": {"code": "invalid_call_sid", "message": "an unknown or live CallSid"}}, status=409)
        try:
            self.registry.check_capacity()
        except SessionLimitReached as exc:
            return web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=503)
        ws = web.WebSocketResponse(heartbeat=self.config.ping_timeout_s, max_msg_size=self.config.max_body_bytes * 4)
        await ws.prepare(request)
        # The phone network and the handset cancel their own echo.
        echo = EchoCanceller(self.config.echo_cancel, True)
        session = TwilioSession(ws, prepare_socket(request), self.config.ws_send_queue_s, echo, call_sid)
        await hold(ws, session, self.registry, self.factory)
        return ws
