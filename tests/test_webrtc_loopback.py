"""Integration: a real aiortc client calls the real server over 127.0.0.1 through the loopback profile."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from controller.loopback import JITTER_RESERVE_MS
from testkit.peer import ClientPeer, OfferRefused
from tests.signals import segment_alignments, speechlike

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


async def test_signal_comes_back_after_the_delay(server):
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    created = await peer.wait_event("session.created")
    assert created["session"]["id"] == session_id

    signal = speechlike(1.5, 48000)
    await peer.changed.wait_for(lambda: peer.received, timeout=5)
    sent_at = time.monotonic()
    peer.speak(signal, 48000)
    await peer.wait_audio(voiced_seconds=0.5, timeout=10)

    # Opus changes the waveform's phase, so compare loudness envelopes, half a second at a time: a
    # late packet on a loaded machine may put one short gap into the echo, which shifts what follows
    # but must not hide it. The lag is the configured 300 ms delay plus the playout reserve, plus
    # transport: aiortc's receiver holds 4 packets (80 ms) on each side, and pacing adds up to a
    # frame at each end.
    expected_ms = (sent_at - peer.received[0].arrival) * 1000 + 300 + JITTER_RESERVE_MS
    # The far end of the window is generous: on a loaded machine the path adds latency of its own;
    # what this test holds is that the echo never comes early and comes back whole, in order.
    search_ms = (expected_ms - 40, expected_ms + 1200)
    # Keep recording until the last piece could have come back at the latest lag searched.
    needed_frames = (search_ms[1] + 1500) / 20 + 1
    await peer.changed.wait_for(lambda: len(peer.received) > needed_frames, timeout=10)
    pieces = segment_alignments(signal, peer.received_audio(), 48000, 500, search_ms)
    agent = server.registry.get(session_id).agent
    report = f"pieces (score, lag ms) {[(round(s, 2), lag) for s, lag in pieces]}, expected lag {expected_ms:.0f}, underruns {agent.underruns}"
    lags = [lag for score, lag in pieces if score > 0.85]
    assert len(lags) >= 2, f"echo does not match what was sent: {report}"
    # A gap only ever delays what follows. A packet the loaded machine drops on either receive path
    # (aiortc's jitter buffer skips a packet that comes too late) takes one 20 ms frame out, which
    # makes what follows a frame earlier; beyond that, a hop (5 ms) of wobble is measurement.
    assert all(later >= earlier - 25 for earlier, later in zip(lags, lags[1:])), f"echo pieces out of order: {report}"
    assert expected_ms <= lags[0] <= expected_ms + 1100, report
    session = server.registry.get(session_id)
    assert session.frames_received > 75  # 1.5 s of 20 ms frames reached the agent
    assert session.output.audio_frames_sent >= 70

    await peer.close()
    await asyncio.wait_for(session.closed.wait(), 10)
    assert len(server.registry) == 0
    assert not session.tasks
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith(session_id) and not t.done()]
    assert leftovers == []


async def test_a_client_that_stops_pinging_and_sending_is_closed(start_server):
    server = await start_server(ping_timeout_s=0.5, media_timeout_s=30)
    peer = ClientPeer(server.url, ping_interval_s=0.1)
    session_id = await peer.connect()
    session = server.registry.get(session_id)
    await peer.changed.wait_for(lambda: len(peer.received) >= 10, timeout=5)  # 200 ms in: pings sent
    peer.go_quiet()  # froze: no pings, no audio, no hang-up
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.close_reason == "ping_timeout"  # a pinging client is missed sooner than media_timeout_s
    assert len(server.registry) == 0 and not session.tasks
    await peer.close()


async def test_a_call_without_a_data_channel_lives_on_its_audio(start_server):
    server = await start_server(media_timeout_s=0.3, ping_timeout_s=0.2, connect_timeout_s=0.3)
    peer = ClientPeer(server.url, data_channel=False)  # as OBS or a SIP gateway: audio, no pings
    session_id = await peer.connect()
    session = server.registry.get(session_id)
    peer.speak(speechlike(1.5, 48000), 48000)
    await peer.wait_audio(voiced_seconds=0.6, timeout=10)  # its echo (300 ms late), past every timeout
    assert not session.close_requested.is_set()
    peer.go_quiet()
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.close_reason == "media_timeout"
    assert len(server.registry) == 0 and not session.tasks
    await peer.close()


async def test_an_offer_that_never_connects_frees_its_slot(start_server):
    server = await start_server(max_sessions=1, connect_timeout_s=0.5)
    ghost = RTCPeerConnection()
    ghost.addTransceiver("audio")
    await ghost.setLocalDescription(await ghost.createOffer())
    async with aiohttp.ClientSession() as http:  # the answer is never applied: nothing ever connects
        async with http.post(f"{server.url}/api/offer", json={"sdp": ghost.localDescription.sdp, "type": "offer"}) as r:
            session = server.registry.get((await r.json())["session_id"])
    await asyncio.wait_for(session.closed.wait(), 5)
    assert session.close_reason == "connect_timeout" and len(server.registry) == 0
    caller = ClientPeer(server.url)
    await caller.connect()  # the slot is free again
    await caller.close()
    await ghost.close()

async def test_session_limit_answers_503(start_server):
    server = await start_server(max_sessions=1)
    first = ClientPeer(server.url)
    await first.connect()
    second = ClientPeer(server.url)
    with pytest.raises(OfferRefused) as refused:
        await second.connect()
    assert refused.value.status == 503
    assert refused.value.body["error"]["code"] == "session_limit"
    await second.close()
    await first.close()


async def test_large_events_arrive_split_and_whole(server):
    peer = ClientPeer(server.url)
    await peer.connect()
    await peer.wait_event("session.created")
    too_long = {"type": "session.update", "session": {"delay_ms": "x" * 2000}}
    peer.send(too_long)
    error = await peer.wait_event("error")
    assert error["error"]["code"] == "message_too_large"
    # An error echoing a long id is itself over the limit and must come through the chunking.
    peer.send({"type": "conversation.item.create", "event_id": "e" * 900,
               "item": {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    unsupported = await peer.wait_event("error", predicate=lambda e: e["error"]["code"] == "unsupported")
    assert unsupported["error"]["event_id"] == "e" * 900
    await peer.close()


async def test_flush_silences_the_very_next_frame(server):
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    session = server.registry.get(session_id)
    session.output.write(np.full(48000 * 2, 0.3, dtype=np.float32), 48000)
    first_frame = session.output.next_frame()
    assert np.all(first_frame != 0)
    session.output.flush()
    assert np.all(session.output.next_frame() == 0)
    await peer.close()


async def test_one_address_may_hold_only_a_few_offers_that_never_connect(start_server):
    server = await start_server(pending_offers_per_address=2, connect_timeout_s=1.0)
    ghosts = [RTCPeerConnection() for _ in range(3)]
    statuses = []
    async with aiohttp.ClientSession() as http:
        for ghost in ghosts:  # offers whose answers are never applied
            ghost.addTransceiver("audio")
            await ghost.setLocalDescription(await ghost.createOffer())
            async with http.post(f"{server.url}/api/offer", json={"sdp": ghost.localDescription.sdp, "type": "offer"}) as r:
                statuses.append((r.status, (await r.json()).get("error", {}).get("code")))
    assert statuses == [(200, None), (200, None), (429, "too_many_pending_offers")]
    await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in server.registry)), 5)
    caller = ClientPeer(server.url)  # once they timed out, the address may call
    await caller.connect()
    await caller.close()
    for ghost in ghosts:
        await ghost.close()


def test_the_aiortc_changes_are_installed_once_when_the_app_is_built():
    """In a fresh interpreter: aiortc's own settings until the app is built, ours after it."""
    script = """
import aiortc.rtcsctptransport as sctp
from config import AppConfig
from context.dialog import TranscriptStore
from realtime.server import build_app
from realtime.echo import EchoCanceller
from realtime.webrtc import WebRTCSession
from pathlib import Path
before = sctp.SCTP_RTO_MIN
WebRTCSession(AppConfig().server, EchoCanceller("off"))  # a session no longer installs anything
assert sctp.SCTP_RTO_MIN == before, before
build_app(AppConfig(profile="loopback"), lambda io: None, TranscriptStore(Path("/nonexistent")))
print(before, sctp.SCTP_RTO_MIN)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0.22"]
