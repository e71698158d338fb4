"""A client of the server's `/ws` transport with the same face as the WebRTC ClientPeer, so the
harness measures either path with the same code."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import numpy as np

from realtime.output import FrameClock, PacedOutput
from realtime.wire import ChunkJoiner, SessionStart
from runtime.tasks import TaskOwner
from testkit.notifier import Notifier
from testkit.peer import RATE, OfferRefused, ReceivedFrame
from testkit.room import SpeakerphoneMic, SpeakerRoom


class WsPeer:
    """One call over the WebSocket: a paced microphone task and a reader task, both owned here."""

    def __init__(self, base_url: str, room: SpeakerRoom | None = None, cancels_echo: bool | None = None, **_: Any) -> None:
        self.url = base_url.rstrip("/").replace("http", "ws", 1) + "/ws"
        self.mic = PacedOutput(RATE) if room is None else SpeakerphoneMic(RATE, room)
        self.cancels_echo = cancels_echo  # what session.start says of the client's own echo canceller
        self.events: list[dict[str, Any]] = []
        self.received: list[ReceivedFrame] = []
        self.pongs: set[str] = set()  # the event_ids the server's pongs answered
        self.changed = Notifier()
        self.session_id = ""
        self.expect_events = True
        self._joiner = ChunkJoiner()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks = TaskOwner("ws-peer")

    async def connect(self, timeout: float = 10.0) -> str:
        self._http = aiohttp.ClientSession()
        try:
            self._ws = await self._http.ws_connect(self.url)
        except aiohttp.WSServerHandshakeError as exc:  # refused before the upgrade (503 when full)
            raise OfferRefused(exc.status, {"error": {"message": exc.message}}) from None
        await self._ws.send_str(json.dumps(SessionStart(RATE, RATE, self.cancels_echo).to_dict()))
        self._tasks.spawn(self._send_mic(), "mic")
        self._tasks.spawn(self._read(), "read")
        created = await self.changed.wait_for(self._created, timeout)
        self.session_id = created["session"]["id"]
        return self.session_id

    def _created(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["type"] == "session.created"), None)

    async def send(self, message: str | bytes) -> None:
        """A text message, or binary (which the server takes as audio), as it is."""
        assert self._ws is not None
        if isinstance(message, str):
            await self._ws.send_str(message)
        else:
            await self._ws.send_bytes(message)

    def speak(self, pcm: np.ndarray, sample_rate: int) -> None:
        self.mic.write(pcm, sample_rate)

    async def _send_mic(self) -> None:
        clock = FrameClock(0.02)
        assert self._ws is not None
        while True:
            await clock.tick()
            await self._ws.send_bytes(self.mic.next_frame().astype("<i2").tobytes())

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                pcm = np.frombuffer(message.data, "<i2").astype(np.float32) / 32768
                self.received.append(ReceivedFrame(time.monotonic(), pcm))
                if isinstance(self.mic, SpeakerphoneMic):
                    self.mic.play(pcm)
            elif message.type == aiohttp.WSMsgType.TEXT:
                event = self._joiner.feed(message.data)
                if event is not None and event["type"] == "pong":
                    self.pongs.add(str(event.get("event_id")))
                elif event is not None:
                    event["_received"] = time.monotonic()
                    self.events.append(event)
            self.changed.notify()

    async def close(self) -> None:
        await self._tasks.aclose()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
