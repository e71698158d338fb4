"""The WebSocket transport, for clients without WebRTC.

The first message is JSON text `{"type": "session.start", "input_sample_rate": R, "output_sample_rate": R2}`.
After it, binary messages are PCM16 mono at R; text messages are client events. The server sends
JSON events as text and paced 20 ms PCM16 mono frames at R2 (default 16000) as binary.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from config import ServerConfig
from realtime.audio import InputFramer
from realtime.echo import EchoCanceller
from realtime.events import Error, EventError
from realtime.output import FrameClock, PacedOutput
from realtime.session import AgentFactory, Session, SessionLimitReached, SessionRegistry
from realtime.wire import SessionStart
from runtime.audio import FRAME_MS, to_float

START_TIMEOUT_S = 10.0
MAX_AUDIO_MESSAGE_S = 1.0
# The kernel's share of what a client may leave unread (the outbox holds the rest): left to itself
# it grows a socket's send buffer to megabytes, a minute of audio held before the outbox even fills.
SEND_BUFFER_BYTES = 64 * 1024
CLOSE_TIMEOUT_S = 2.0  # a closing handshake with a client that does not read cannot finish


class WebSocketSession(Session):
    """A Session carried by one WebSocket."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        start: SessionStart,
        send_queue_s: float,
        echo: EchoCanceller,
        name: str = "websocket",
        defaults: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        self._ws = ws
        self._transport = transport
        # One ordered outbox for events and audio, drained by a single writer task; a client that
        # stops reading is closed once `send_queue_s` of frames wait in it, not buffered forever.
        self._outbox: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=max(1, round(send_queue_s * 1000 / FRAME_MS)))
        super().__init__(name, PacedOutput(start.output_sample_rate), self._send, echo, defaults, session_id)
        self.input_rate = start.input_sample_rate
        self._framer = InputFramer()
        self.on_close(self._teardown)

    def start(self, factory: AgentFactory) -> None:
        self.spawn(self._write(), "writer")
        self.start_agent(factory)
        self.spawn(self._pace_audio(), "output")

    def _send(self, message: str | bytes) -> None:
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.request_close("client_too_slow")

    async def _write(self) -> None:
        while True:
            message = await self._outbox.get()
            if isinstance(message, str):
                await self._ws.send_str(message)
            else:
                await self._ws.send_bytes(message)

    def on_binary(self, data: bytes) -> None:
        self.on_audio(data)

    def on_audio(self, data: bytes) -> None:
        if len(data) % 2:
            self.reject("invalid_audio", "binary messages must be whole PCM16 samples (even length)")
            return
        if len(data) > 2 * self.input_rate * MAX_AUDIO_MESSAGE_S:
            self.reject("message_too_large", f"audio messages may hold at most {MAX_AUDIO_MESSAGE_S} s")
            return
        pcm = to_float(np.frombuffer(data, dtype="<i2"))
        for frame in self._framer.push(pcm, self.input_rate):
            self.push_frame(frame)

    async def _pace_audio(self) -> None:
        clock = FrameClock(FRAME_MS / 1000)
        while True:
            await clock.tick()
            self._send(self.output.next_frame().astype("<i2").tobytes())

    async def _send_left_events(self) -> None:
        """The writer is gone: send the events it left (session.closed last), not the audio."""
        try:
            while not self._outbox.empty():
                message = self._outbox.get_nowait()
                if isinstance(message, str):
                    await self._ws.send_str(message)
        except ConnectionError:  # the client went first
            pass

    async def _teardown(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._send_left_events()
                await self._ws.close()
        except TimeoutError:
            self.log.info("session.close_unacknowledged")
            if self._transport is not None:
                self._transport.abort()


def prepare_socket(request: web.Request) -> asyncio.Transport | None:
    """The request's transport, its send buffer bounded (see SEND_BUFFER_BYTES)."""
    transport = request.transport
    if transport is not None and (sock := transport.get_extra_info("socket")) is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    return transport


async def hold(
    ws: web.WebSocketResponse, session: WebSocketSession, registry: SessionRegistry, factory: AgentFactory
) -> None:
    """Register `session` (or refuse it, the server being full), run it on the socket's messages
    until either side ends it, and close it."""
    try:
        registry.add(session)  # others may have filled the server since the upgrade
    except SessionLimitReached as exc:
        await ws.send_json(Error(exc.code, str(exc)).to_dict())
        await ws.close(code=1013, message=exc.code.encode())
        return
    session.start(factory)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                session.on_binary(msg.data)
            elif msg.type == WSMsgType.TEXT:
                session.receive(msg.data)
            if session.close_requested.is_set():
                break
    finally:
        await session.close(session.close_reason or "hangup")


async def serve_websocket(
    request: web.Request, config: ServerConfig, registry: SessionRegistry, factory: AgentFactory
) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=config.ping_timeout_s, max_msg_size=config.max_body_bytes * 4)
    await ws.prepare(request)
    transport = prepare_socket(request)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            first = await ws.receive()
        if first.type != WSMsgType.TEXT:
            raise EventError("invalid_session_start", "the first message must be JSON text: session.start")
        start = SessionStart.parse(first.data)
    except (EventError, TimeoutError) as exc:
        message = str(exc) or "no session.start within the time limit"
        await ws.send_json(Error("invalid_session_start", message).to_dict())
        await ws.close(code=1008, message=b"invalid session.start")
        return ws
    echo = EchoCanceller(config.echo_cancel, start.client_echo_cancellation)
    await hold(ws, WebSocketSession(ws, transport, start, config.ws_send_queue_s, echo), registry, factory)
    return ws
