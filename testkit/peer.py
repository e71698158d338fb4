"""A WebRTC client of the server, as a browser would be: a paced microphone, the agent's audio
recorded with arrival times, the server's events, and the data-channel ping."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from realtime import aiortc_patches
from realtime.audio import frame_to_mono
from realtime.events import ClientEvent, Ping
from realtime.opus import hold_received_frames
from realtime.output import PacedOutput
from realtime.webrtc import PacedAudioTrack
from realtime.wire import ChunkJoiner
from runtime.tasks import TaskOwner
from testkit.impair import Impairment, UdpRelay
from testkit.notifier import Notifier
from testkit.room import SpeakerphoneMic, SpeakerRoom

RATE = 48000
# A browser's playout delay on a loopback call: headless Chromium's jitter buffer held 30 ms
# (`python -m bench.experiments.browser_jitter`), aiortc's own holds 4 frames (80 ms). Two frames, 40 ms.
BROWSER_PLAYOUT_FRAMES = 2


@dataclass
class ReceivedFrame:
    arrival: float  # time.monotonic()
    pcm: np.ndarray  # mono float32 at RATE


class OfferRefused(RuntimeError):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class SilentTrack(MediaStreamTrack):
    """An audio track that never yields a frame: its sender sends no RTP at all."""

    kind = "audio"

    async def recv(self) -> AudioFrame:
        await asyncio.Event().wait()
        raise MediaStreamError


class ClientPeer:
    """One call to the server over WebRTC. Owns its peer connection and its ping and recorder tasks."""

    def __init__(
        self,
        base_url: str,
        *,
        ping_interval_s: float | None = 1.0,
        offer_path: str = "/api/offer",
        events: bool = True,
        data_channel: bool = True,
        playout_frames: int = BROWSER_PLAYOUT_FRAMES,
        headers: dict[str, str] | None = None,
        impairment: Impairment | None = None,
        room: SpeakerRoom | None = None,
        cancels_echo: bool | None = None,
    ) -> None:
        """`room`: a speakerphone, whose echo of the agent comes back in the microphone;
        `cancels_echo`: what the offer says of the client's own echo canceller (None: nothing)."""
        self.cancels_echo = cancels_echo
        self.base_url = base_url.rstrip("/")
        self.offer_path = offer_path
        self.headers = headers or {}  # e.g. the server's bearer token
        # Another server may answer the offer but never open `events`; a plain client (OBS, a SIP
        # gateway) opens no data channel at all.
        self.expect_events = events and data_channel
        self.playout_frames = playout_frames  # received frames held before one is played
        self.mic = PacedOutput(RATE) if room is None else SpeakerphoneMic(RATE, room)
        aiortc_patches.install()  # as a browser: FEC sent, losses concealed, SCTP on Chromium's timers
        self.pc = RTCPeerConnection()
        self.session_id: str | None = None
        self.events: list[dict[str, Any]] = []
        self.received: list[ReceivedFrame] = []
        self._ping_interval_s = ping_interval_s
        self._pings_sent: dict[str, float] = {}
        self.ping_round_trips: list[tuple[float, float]] = []  # (sent at, seconds to its pong)
        self.pongs: set[str] = set()  # the event_ids the server's pongs answered
        self.relay = UdpRelay(impairment) if impairment is not None else None  # the media path goes through it
        self._pinger: asyncio.Task[None] | None = None
        self._joiner = ChunkJoiner()
        self._tasks = TaskOwner("peer")
        self.changed = Notifier()
        self.channel = self.pc.createDataChannel("events") if data_channel else None
        if self.channel is not None:
            self.channel.on("message", self._on_message)
        self.pc.addTrack(PacedAudioTrack(self.mic))
        self.pc.on("track", self._on_track)

    async def connect(self, timeout: float = 10.0) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer: dict[str, Any] = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        if self.cancels_echo is not None:
            offer["client_echo_cancellation"] = self.cancels_echo
        if self.relay is not None:
            await self.relay.start()
            offer["sdp"] = self.relay.steer_offer(offer["sdp"])
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.base_url}{self.offer_path}", json=offer, headers=self.headers) as response:
                body = await response.json()
                if response.status != 200:
                    raise OfferRefused(response.status, body)
        self.session_id = body.get("session_id") or body.get("pc_id") or ""
        sdp = body["sdp"] if self.relay is None else self.relay.steer_answer(body["sdp"])
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=body["type"]))
        for transceiver in self.pc.getTransceivers():
            if transceiver.kind == "audio":
                hold_received_frames(transceiver.receiver, self.playout_frames)
        if self._ping_interval_s and self.channel is not None:
            self._pinger = self._tasks.spawn(self._ping(), "ping")  # pings only once `events` is open, if it ever opens
        if self.expect_events:
            await self.changed.wait_for(lambda: self.channel is not None and self.channel.readyState == "open", timeout)
        return self.session_id

    def send(self, event: ClientEvent | dict[str, Any] | str | bytes) -> None:
        """A client event; a dict, a string or bytes go as they are (tests send malformed ones)."""
        assert self.channel is not None, "this peer has no data channel"
        if isinstance(event, ClientEvent):
            event = event.to_dict()
        self.channel.send(event if isinstance(event, (str, bytes)) else json.dumps(event))

    def speak(self, pcm: np.ndarray, sample_rate: int) -> None:
        self.mic.write(pcm, sample_rate)

    def go_quiet(self) -> None:
        """Send nothing more, without hanging up: a client that froze or lost its network."""
        self._tasks.cancel(self._pinger)
        for sender in self.pc.getSenders():
            if sender.track is not None and sender.track.kind == "audio":
                sender.replaceTrack(SilentTrack())

    async def _ping(self) -> None:
        assert self.channel is not None
        for number in itertools.count():
            if self.channel.readyState == "open":
                event_id = f"ping_{number}"
                self._pings_sent[event_id] = time.monotonic()
                self.send(Ping(event_id=event_id))
            await asyncio.sleep(self._ping_interval_s)

    def event_stalls(self, over_s: float = 1.0) -> int:
        """Pings whose pong took longer than `over_s`, or has not come though it is that late."""
        late = sum(1 for _, seconds in self.ping_round_trips if seconds > over_s)
        answered = {sent for sent, _ in self.ping_round_trips}
        now = time.monotonic()
        return late + sum(1 for sent in self._pings_sent.values() if sent not in answered and now - sent > over_s)

    def _on_message(self, text: str) -> None:
        event = self._joiner.feed(text)
        if event is not None and event["type"] == "pong":
            self.pongs.add(str(event.get("event_id")))
            sent = self._pings_sent.get(event.get("event_id") or "")
            if sent is not None:
                self.ping_round_trips.append((sent, time.monotonic() - sent))
        elif event is not None:
            event["_received"] = time.monotonic()
            self.events.append(event)
            self.changed.notify()

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._tasks.spawn(self._record(track), "record")

    async def _record(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.received.append(ReceivedFrame(time.monotonic(), frame_to_mono(frame)))
            if isinstance(self.mic, SpeakerphoneMic):
                self.mic.play(self.received[-1].pcm)
            self.changed.notify()

    async def wait_event(
        self, event_type: str, timeout: float = 10.0, predicate: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((e for e in self.events if e["type"] == event_type and predicate(e)), None)

        return await self.changed.wait_for(find, timeout)

    def received_audio(self) -> np.ndarray:
        if not self.received:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([f.pcm for f in self.received])

    async def wait_audio(self, voiced_seconds: float, timeout: float, threshold: float = 0.01) -> None:
        """Until at least `voiced_seconds` of received 20 ms frames have an RMS above `threshold`."""
        needed = int(voiced_seconds * 50)

        def enough() -> bool:
            return sum(1 for f in self.received if np.sqrt(np.mean(f.pcm**2)) > threshold) >= needed

        await self.changed.wait_for(enough, timeout)

    async def close(self) -> None:
        await self._tasks.aclose()
        await self.pc.close()
        if self.relay is not None:
            self.relay.close()
