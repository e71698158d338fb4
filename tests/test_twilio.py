"""Phone callers through Twilio Media Streams: G.711 as the reference coder makes it, the voice
webhook and the stream checked against Twilio's signature (its own helper library's), and a call
from a peer that speaks Twilio's protocol at 8 kHz mu-law: answered, its marks returned, a barge-in
cleared, the history cut to what the phone played."""

from __future__ import annotations

import warnings
from urllib.parse import urlencode

import aiohttp
import numpy as np
import pytest
from twilio.request_validator import RequestValidator

from runtime.g711 import int16_to_ulaw, ulaw_to_int16
from testkit.twilio_peer import TwilioPeer
from tests.test_openai_realtime import Scripted

pytestmark = pytest.mark.unit

TOKEN = "twilio-auth-token"


def test_mu_law_is_the_reference_coder_s_for_every_sample():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # the reference (Sun's g711.c), in the standard library until 3.13

    samples = np.arange(-32768, 32768, dtype=np.int16)
    assert int16_to_ulaw(samples) == audioop.lin2ulaw(samples.tobytes(), 2)
    codes = bytes(range(256))
    assert ulaw_to_int16(codes).tobytes() == audioop.ulaw2lin(codes, 2)


async def test_the_voice_webhook_answers_only_twilio(start_server):
    server = await start_server(twilio_auth_token=TOKEN)
    url = f"{server.url}/twilio/voice"
    params = {"CallSid": "CA" + "1" * 32, "From": "+15550100"}
    signature = RequestValidator(TOKEN).compute_signature(url, params)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=urlencode(params), headers={**form, "X-Twilio-Signature": signature}) as answered:
            assert answered.status == 200 and answered.content_type == "text/xml"
            assert f'<Stream url="{server.url.replace("http", "ws", 1)}/twilio/media/{params["CallSid"]}" />' in await answered.text()
        async with http.post(url, data=urlencode({**params, "From": "+15550666"}), headers={**form, "X-Twilio-Signature": signature}) as forged:
            assert forged.status == 403
        async with http.post(url, data=urlencode(params), headers=form) as unsigned:
            assert unsigned.status == 403
        async with http.get(server.url.replace("http", "ws", 1) + f"/twilio/media/{params['CallSid']}") as unsigned_stream:
            assert unsigned_stream.status == 403
        # Behind a TLS proxy the stream is wss:// on the proxy's name, and the signature is of that URL.
        behind = "https://voice.example.com/twilio/voice"
        headers = {**form, "X-Forwarded-Proto": "https", "X-Forwarded-Host": "voice.example.com",
                   "X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(behind, params)}
        async with http.post(url, data=urlencode(params), headers=headers) as proxied:
            assert f'<Stream url="wss://voice.example.com/twilio/media/{params["CallSid"]}" />' in await proxied.text()
    off = await start_server()
    async with aiohttp.ClientSession() as http, http.post(f"{off.url}/twilio/voice", data="") as response:
        assert response.status == 404


async def test_a_full_server_turns_the_call_away_busy(start_server):
    server = await start_server(twilio_auth_token=TOKEN, max_sessions=1)
    first = TwilioPeer(server.url, TOKEN)
    await first.connect()
    url = f"{server.url}/twilio/voice"
    params = {"CallSid": "CA" + "2" * 32}
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(url, params)}
    try:
        async with aiohttp.ClientSession() as http, http.post(url, data=urlencode(params), headers=headers) as response:
            assert response.status == 200 and '<Reject reason="busy" />' in await response.text()
    finally:
        await first.close()


async def test_a_phone_call_is_answered_its_marks_say_what_was_heard_and_a_barge_in_clears(start_server):
    agents = Scripted()
    server = await start_server(factory=agents, twilio_auth_token=TOKEN)
    peer = TwilioPeer(server.url, TOKEN)
    await peer.connect()
    try:
        await peer.changed.wait_for(lambda: len(server.registry) == 1 and peer.received, timeout=10)
        session = next(iter(server.registry))
        assert session.transport == "twilio" and session.id == peer.session_id == "sess_" + peer.call_sid
        agents.tokenizer.transcript = "What is the capital of France?"
        peer.speak(np.full(8000, 0.1, np.float32), 8000)  # a second of speech
        # The reply plays on the handset (the scripted decoder's tone, 0.25, through mu-law).
        await peer.changed.wait_for(lambda: sum(np.abs(f.pcm).mean() > 0.2 for f in peer.received) >= 25, timeout=30)
        assert session.marks_returned > 0 and session.call_sid == peer.call_sid
        playback = session.io().playback
        heard_before = playback.heard_ms()
        # What was heard is where the phone's last returned mark says, not the server's guess.
        assert 0 < heard_before <= playback.sent_ms and f"{playback.response_id}:{round(heard_before)}" in peer.returned
        # The caller talks over the reply for 1.5 s: it is cut off, and Twilio told to drop what it holds.
        agents.tokenizer.transcript = "Stop, what about Spain?"
        peer.speak(np.full(12000, 0.1, np.float32), 8000)
        await peer.changed.wait_for(lambda: any(m["event"] == "clear" for m in peer.messages), timeout=15)
        cut = agents.contexts[0].turns
        await peer.changed.wait_for(lambda: any(t.status == "interrupted" for t in cut), timeout=10)
        kept = next(t for t in cut if t.status == "interrupted")
        assert kept.text and len(kept.text.split()) < len(agents.lm.reply.split())
        peer.dtmf("5")
        await peer.changed.wait_for(lambda: session.dtmf == ["5"], timeout=5)
    finally:
        await peer.close()
