"""Bad input of every kind gets a clear error, and a concurrent healthy call is not disturbed."""

from __future__ import annotations

import pytest

import json

import aiohttp
import numpy as np

from testkit.peer import ClientPeer
from tests.signals import speechlike

pytestmark = pytest.mark.unit

DEEP = "[" * 30000 + "]" * 30000  # JSON nested deeper than Python's parser goes, under the body limit
VALID_LOOKING_SDP = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"


async def post(http: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, dict]:
    async with http.post(url, **kwargs) as response:
        return response.status, await response.json()


async def test_bad_requests_leave_a_healthy_call_alone(server):
    healthy = ClientPeer(server.url)
    healthy_id = await healthy.connect()
    healthy.speak(speechlike(20.0, 48000), 48000)
    await healthy.wait_audio(voiced_seconds=0.3, timeout=10)
    session = server.registry.get(healthy_id)
    before = session.frames_received

    offer_url = f"{server.url}/api/offer"
    async with aiohttp.ClientSession() as http:
        cases = [
            (dict(data="{not json", headers={"Content-Type": "application/json"}), 400, "invalid_json"),
            (dict(json={"sdp": 5, "type": "offer"}), 400, "invalid_offer"),
            (dict(json={"sdp": VALID_LOOKING_SDP, "type": "answer"}), 400, "invalid_offer"),
            (dict(json={"sdp": VALID_LOOKING_SDP, "type": "offer", "client_echo_cancellation": "yes"}), 400, "invalid_offer"),
            (dict(json={"sdp": "hello", "type": "offer"}), 400, "invalid_sdp"),
            (dict(json={"sdp": VALID_LOOKING_SDP, "type": "offer"}), 400, "invalid_sdp"),
            (dict(json={"sdp": VALID_LOOKING_SDP + "a=" + "x" * 70000, "type": "offer"}), 413, "body_too_large"),
            (dict(data="sdp=1", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
             "unsupported_media_type"),
            (dict(data=DEEP, headers={"Content-Type": "application/json"}), 400, "invalid_json"),
        ]
        for kwargs, status, code in cases:
            got_status, body = await post(http, offer_url, **kwargs)
            assert (got_status, body["error"]["code"]) == (status, code), kwargs
            assert body["error"]["message"]
        async with http.get(f"{server.url}/api/nothing") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"

        # Garbage on /ws: binary before session.start, and a session.start with a bad rate.
        async with http.ws_connect(f"{server.url}/ws") as ws:
            await ws.send_bytes(b"\x00\x01garbage")
            error = await ws.receive_json(timeout=5)
            assert error["error"]["code"] == "invalid_session_start"
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        for start, field in (
            ({"type": "session.start", "input_sample_rate": 12345}, "input_sample_rate"),
            ({"type": "session.start", "input_sample_rate": 16000, "output_sample_rate": 16000.0}, "output_sample_rate"),
            ({"type": "session.start", "input_sample_rate": 16000, "client_echo_cancellation": 1}, "client_echo_cancellation"),
            (DEEP, "session.start"),
        ):
            async with http.ws_connect(f"{server.url}/ws") as ws:
                await ws.send_str(start if isinstance(start, str) else json.dumps(start))
                error = await ws.receive_json(timeout=5)
                assert error["error"]["code"] == "invalid_session_start" and field in error["error"]["message"]
                assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    # Bad messages on the healthy call's own data channel get error events and change nothing.
    healthy.send("{oops")
    healthy.send({"type": "no.such.event"})
    healthy.send({"type": "session.update", "session": {"delay_ms": -5}})
    codes = set()
    for code in ("invalid_json", "unknown_event", "invalid_value"):
        codes.add((await healthy.wait_event("error", predicate=lambda e, c=code: e["error"]["code"] == c))["error"]["code"])
    assert codes == {"invalid_json", "unknown_event", "invalid_value"}
    assert server.registry.get(healthy_id).agent.delay_ms == 300

    # The healthy call kept flowing the whole time, both ways.
    received_before = len(healthy.received)
    await healthy.changed.wait_for(lambda: session.frames_received > before + 50, timeout=10)
    await healthy.changed.wait_for(lambda: len(healthy.received) > received_before + 25, timeout=10)
    recent = np.concatenate([f.pcm for f in healthy.received[-25:]])
    assert np.sqrt(np.mean(recent**2)) > 0.005
    assert len(server.registry) == 1 and not session.closed.is_set()
    await healthy.close()


async def test_a_text_message_that_is_not_utf8_gets_an_error_and_the_call_goes_on(server):
    """Browsers cannot send one; another client can, and aiortc used to end the call on it."""
    from aiortc.rtcsctptransport import WEBRTC_STRING

    peer = ClientPeer(server.url, ping_interval_s=None)
    try:
        session_id = await peer.connect()
        channel = peer.channel
        assert channel is not None
        transport = channel.transport
        transport._data_channel_queue.append((channel, WEBRTC_STRING, b'{"type": "\xff\xfe"}'))
        await transport._data_channel_flush()
        error = await peer.wait_event("error", timeout=5)
        assert error["error"]["code"] == "invalid_json"
        peer.send({"type": "ping", "event_id": "still_there"})
        await peer.changed.wait_for(lambda: "still_there" in peer.pongs, timeout=5)
        assert not server.registry.get(session_id).closed.is_set()
    finally:
        await peer.close()
