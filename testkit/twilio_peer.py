"""A phone caller as Twilio carries one: it asks the voice webhook what to do (`POST /twilio/voice`,
signed), opens the media stream the TwiML names (signed), and speaks Twilio's messages: mu-law at
8 kHz in 20 ms `media` messages, the reply played out in real time from a buffer, each `mark`
returned once the audio sent before it has played, `clear` dropping what has not. The same face as
the other peers (`received`, `changed`, `speak`), without our events: a phone has none."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import aiohttp
import numpy as np
import soxr
from twilio.request_validator import RequestValidator

from realtime.output import FrameClock, PacedOutput
from runtime.g711 import int16_to_ulaw, ulaw_to_int16
from runtime.tasks import TaskOwner
from testkit.notifier import Notifier
from testkit.peer import RATE, OfferRefused, ReceivedFrame

PHONE_RATE = 8000
PHONE_FRAME = PHONE_RATE // 50
RATE_FRAME = RATE // 50


class TwilioPeer:
    """One phone call: the microphone task, the reader, and the handset's playout, owned here."""

    def __init__(self, base_url: str, auth_token: str, **_: Any) -> None:
        self.base_url = base_url.rstrip("/")
        self.validator = RequestValidator(auth_token)
        self.mic = PacedOutput(PHONE_RATE)
        self.call_sid = "CA" + uuid.uuid4().hex
        self.session_id = "sess_" + self.call_sid  # the server names a phone call's session after it
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.events: list[dict[str, Any]] = []  # none: what a phone hears is audio
        self.expect_events = False
        self.received: list[ReceivedFrame] = []  # what the handset played, at RATE
        self.messages: list[dict[str, Any]] = []  # what the server sent on the stream
        self.returned: list[str] = []  # the marks handed back, played
        self.changed = Notifier()
        self._queue = np.zeros(0, dtype=np.int16)  # reply audio not yet played
        self._queued = 0  # samples ever queued
        self._played = 0  # samples ever played
        self._marks: list[tuple[int, str]] = []  # (queued position, name), to return once played
        # The quick quality: the high one hands its output on in ~130 ms blocks, a delay no handset has.
        self._to_rate = soxr.ResampleStream(PHONE_RATE, RATE, 1, dtype="float32", quality="QQ")
        self._heard = np.zeros(0, dtype=np.float32)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks = TaskOwner("twilio-peer")

    def _signature(self, url: str, params: dict[str, str]) -> dict[str, str]:
        return {"X-Twilio-Signature": self.validator.compute_signature(url, params)}

    async def connect(self, timeout: float = 10.0) -> str:
        self._http = aiohttp.ClientSession()
        voice = f"{self.base_url}/twilio/voice"
        params = {"CallSid": self.call_sid, "From": "+15550100", "To": "+15550199", "CallStatus": "ringing"}
        async with self._http.post(voice, data=urlencode(params), headers={
            **self._signature(voice, params), "Content-Type": "application/x-www-form-urlencoded"}) as response:
            twiml = await response.text()
            if response.status != 200:
                raise OfferRefused(response.status, {"error": {"message": twiml}})
        found = re.search(r'<Stream url="([^"]+)"', twiml)
        if found is None:
            raise OfferRefused(503, {"error": {"message": f"no stream in the TwiML: {twiml}"}})
        stream_url = found.group(1)
        self._ws = await self._http.ws_connect(stream_url, headers=self._signature(stream_url, {}))
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send({"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": {
            "streamSid": self.stream_sid, "callSid": self.call_sid, "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
            "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": PHONE_RATE, "channels": 1}}})
        self._tasks.spawn(self._send_mic(), "mic")
        self._tasks.spawn(self._read(), "read")
        self._tasks.spawn(self._play(), "handset")
        return self.session_id

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    def speak(self, pcm: np.ndarray, sample_rate: int) -> None:
        self.mic.write(pcm, sample_rate)

    def dtmf(self, digit: str) -> None:
        self._tasks.spawn(self._send({"event": "dtmf", "streamSid": self.stream_sid, "dtmf": {"track": "inbound_track", "digit": digit}}), "dtmf")

    async def _send_mic(self) -> None:
        clock = FrameClock(0.02)
        chunk = 0
        while True:
            await clock.tick()
            chunk += 1
            payload = base64.b64encode(int16_to_ulaw(self.mic.next_frame())).decode()
            await self._send({"event": "media", "sequenceNumber": str(chunk + 1), "streamSid": self.stream_sid, "media": {
                "track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20), "payload": payload}})

    async def _read(self) -> None:
        assert self._ws is not None
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            msg = json.loads(message.data)
            msg["_received"] = time.monotonic()
            self.messages.append(msg)
            if msg["event"] == "media":
                audio = ulaw_to_int16(base64.b64decode(msg["media"]["payload"]))
                self._queue = np.concatenate([self._queue, audio])
                self._queued += len(audio)
            elif msg["event"] == "mark":
                self._marks.append((self._queued, msg["mark"]["name"]))
            elif msg["event"] == "clear":
                self._played += len(self._queue)  # dropped: as if played, for the marks
                self._queue = self._queue[:0]
            await self._return_marks()
            self.changed.notify()

    async def _return_marks(self) -> None:
        while self._marks and self._marks[0][0] <= self._played:
            _, name = self._marks.pop(0)
            self.returned.append(name)
            await self._send({"event": "mark", "sequenceNumber": "0", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def _play(self) -> None:
        """The handset: 20 ms of what is queued (or silence) each tick, as the caller hears it."""
        clock = FrameClock(0.02)
        while True:
            await clock.tick()
            frame, self._queue = self._queue[:PHONE_FRAME], self._queue[PHONE_FRAME:]
            self._played += len(frame)
            frame = np.pad(frame, (0, PHONE_FRAME - len(frame)))
            # The resampler hands its output on in blocks of its own: 20 ms of it a tick.
            self._heard = np.concatenate([self._heard, self._to_rate.resample_chunk(frame.astype(np.float32) / 32768)])
            heard, self._heard = self._heard[:RATE_FRAME], self._heard[RATE_FRAME:]
            self.received.append(ReceivedFrame(time.monotonic(), np.pad(heard, (RATE_FRAME - len(heard), 0))))
            await self._return_marks()
            self.changed.notify()

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._send({"event": "stop", "streamSid": self.stream_sid, "stop": {"callSid": self.call_sid}})
        await self._tasks.aclose()
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
