"""The WebRTC transport: one aiortc peer per session, the paced output track and the `events` channel."""

from __future__ import annotations

import asyncio
import fractions
import re

import aioice.ice
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from av import AudioFrame

from config import IceServer, ServerConfig
from realtime.audio import InputFramer, frame_to_mono
from realtime.echo import EchoCanceller
from realtime.opus import hold_received_frames
from realtime.output import FrameClock, PacedOutput
from realtime.session import AgentFactory, Session, SessionRegistry
from runtime.audio import FRAME_MS

OUTPUT_RATE = 48000
PENDING_EVENTS_LIMIT = 256  # events emitted before the data channel opens
DRAIN_TIMEOUT_S = 1.0  # at hang-up, for the last events to leave


# aiortc holds each received audio frame until 4 more have come (80 ms), as a player would to ride
# out network jitter. The server plays nothing: it analyses frames as they come, so one frame of
# look-ahead (still enough to put a reordered packet back in place) saves 60 ms of every turn.
INPUT_PREFETCH_FRAMES = 1


def use_loopback_ice_only() -> None:
    """Make aioice gather host candidates on 127.0.0.1 only (it skips loopback by default)."""
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ")


def keep_loopback_candidates(sdp: str) -> str:
    """Drop the remote candidates that cannot be reached when the server listens on loopback only."""
    lines = []
    for line in sdp.splitlines():
        match = _CANDIDATE.match(line)
        if match and match.group(1) != "127.0.0.1":
            continue
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def check_offer(sdp: str) -> None:
    """Raise ValueError for an offer aiortc would accept and then fail on in the background: media
    sections have a mid of their own each (or, as in offers from before BUNDLE, none has one), and a
    BUNDLE group names only those."""
    description = SessionDescription.parse(sdp)
    mids = [media.rtp.muxId for media in description.media]
    if not any(media.kind == "audio" for media in description.media):
        raise ValueError("the offer has no audio section")
    if any(mids) and not all(mids):
        raise ValueError("some media sections have an a=mid and some have none")
    if any(mids) and len(set(mids)) != len(mids):
        raise ValueError("media sections share an a=mid")
    for group in description.group:
        if group.semantic == "BUNDLE" and not set(group.items) <= set(mids):
            raise ValueError("the BUNDLE group names a mid that no media section has")


class PacedAudioTrack(MediaStreamTrack):
    """Sends PacedOutput's 20 ms frames to the peer on the wall clock."""

    kind = "audio"

    def __init__(self, output: PacedOutput) -> None:
        super().__init__()
        self._output = output
        self._clock = FrameClock(FRAME_MS / 1000)
        self._time_base = fractions.Fraction(1, output.sample_rate)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        index = await self._clock.tick()
        samples = self._output.next_frame()
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._output.sample_rate
        frame.pts = index * self._output.frame_samples
        frame.time_base = self._time_base
        return frame


def _rtc_ice_servers(servers: tuple[IceServer, ...]) -> list[RTCIceServer]:
    return [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in servers]


class WebRTCSession(Session):
    """A Session carried by an aiortc peer connection."""

    def __init__(self, config: ServerConfig, echo: EchoCanceller) -> None:
        self._channel: RTCDataChannel | None = None
        self._pending: list[str] = []
        self._alive = asyncio.Event()  # set by every received audio frame and client message
        self._config = config
        super().__init__("webrtc", PacedOutput(OUTPUT_RATE), self._send_text, echo)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=_rtc_ice_servers(config.ice_servers)))
        self.track = PacedAudioTrack(self.output)
        self.on_close(self._teardown)

    def _send_text(self, text: str) -> None:
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        elif len(self._pending) < PENDING_EVENTS_LIMIT:
            self._pending.append(text)

    async def answer(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        pc = self.pc

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != "events":
                self.log.warning("session.datachannel_ignored", label=channel.label)
                return
            self._channel = channel
            channel.on("message", self.receive)
            channel.on("close", lambda: self.request_close("datachannel_closed"))
            self._alive.set()
            if channel.readyState == "open":
                self._flush_pending()
            else:
                channel.on("open", self._flush_pending)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self.spawn(self._consume(track), "input")

        @pc.on("connectionstatechange")
        def on_state() -> None:
            self.log.info("session.connection_state", state=pc.connectionState)
            if pc.connectionState == "failed":
                self.request_close("ice_failed")
            elif pc.connectionState == "closed":
                self.request_close("peer_closed")

        await pc.setRemoteDescription(offer)
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio":
                hold_received_frames(transceiver.receiver, INPUT_PREFETCH_FRAMES)
                pc.addTrack(self.track)
                break
        else:
            raise ValueError("the offer has no audio section")
        await pc.setLocalDescription(await pc.createAnswer())
        self.spawn(self._watchdog(), "watchdog")
        return pc.localDescription

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for text in pending:
            self._send_text(text)

    def receive(self, message: str | bytes) -> None:
        self._alive.set()
        super().receive(message)

    async def _consume(self, track: MediaStreamTrack) -> None:
        framer = InputFramer()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.request_close("track_ended")
                return
            self._alive.set()
            for out in framer.push(frame_to_mono(frame), frame.sample_rate):
                self.push_frame(out)

    async def _watchdog(self) -> None:
        """Close the session when the peer shows no life: no audio and no message within
        `connect_timeout_s` of the answer, then for `media_timeout_s` (`ping_timeout_s` once the
        client sends pings). Any client keeps a call up by sending audio; pings are optional."""
        timeout, reason = self._config.connect_timeout_s, "connect_timeout"
        while True:
            try:
                async with asyncio.timeout(timeout):
                    await self._alive.wait()
            except TimeoutError:
                self.request_close(reason)
                return
            self._alive.clear()
            self.pending = False
            if self.pings:
                timeout, reason = self._config.ping_timeout_s, "ping_timeout"
            else:
                timeout, reason = self._config.media_timeout_s, "media_timeout"

    async def _teardown(self) -> None:
        self.track.stop()
        await self._drain_events()
        await self.pc.close()

    async def _drain_events(self) -> None:
        """Let the queued events (session.closed last) reach the network: closing the peer drops
        what SCTP still holds."""
        channel = self._channel
        if channel is None or channel.readyState != "open" or channel.bufferedAmount == 0:
            return
        drained = asyncio.Event()
        channel.once("bufferedamountlow", drained.set)
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await drained.wait()
        except TimeoutError:
            self.log.info("session.events_undelivered", bytes=channel.bufferedAmount)


class TooManyPendingOffers(RuntimeError):
    pass


async def open_webrtc_session(
    offer: RTCSessionDescription,
    config: ServerConfig,
    registry: SessionRegistry,
    factory: AgentFactory,
    address: str | None = None,
    client_cancels_echo: bool | None = None,
) -> tuple[WebRTCSession, RTCSessionDescription]:
    """Answer an offer from `address` with a new registered session (`client_cancels_echo`: what
    the offer said of the client's own echo canceller, if anything).

    Raises SessionLimitReached when full, TooManyPendingOffers when `address` already holds
    `pending_offers_per_address` sessions that never showed life, and any error of the offer's own
    after closing the session.
    """
    registry.check_capacity()
    pending = registry.pending_from(address)
    if pending >= config.pending_offers_per_address:
        raise TooManyPendingOffers(f"{pending} offers from this address have not connected yet")
    check_offer(offer.sdp)
    if config.loopback_ice:
        offer = RTCSessionDescription(sdp=keep_loopback_candidates(offer.sdp), type=offer.type)
    session = WebRTCSession(config, EchoCanceller(config.echo_cancel, client_cancels_echo))
    session.remote_address, session.pending = address, True
    registry.add(session)
    try:
        answer = await session.answer(offer)
        session.start_agent(factory)
    except BaseException:
        await session.close("offer_failed")
        raise
    return session, answer
