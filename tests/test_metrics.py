"""`GET /metrics`: Prometheus text a scraper reads, counting a real call and a refusal."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.peer import ClientPeer
from tests.signals import speechlike

pytestmark = pytest.mark.unit


async def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics, by name and labels."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/metrics", headers=headers or {}) as response:
            assert response.status == 200, await response.text()
            assert response.content_type == "text/plain"
            text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_a_call_and_a_refusal(server):
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    peer.speak(speechlike(1.0, 48000), 48000)
    await peer.wait_audio(voiced_seconds=0.3, timeout=10)
    during = await scrape(server.url)
    assert during[("voice_agent_sessions", (("transport", "webrtc"),))] == 1

    session = server.registry.get(session_id)
    await peer.close()
    await asyncio.wait_for(session.closed.wait(), 10)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/offer", data="{nope", headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400

    after = await scrape(server.url)
    assert after[("voice_agent_sessions", (("transport", "webrtc"),))] == 0
    assert after[("voice_agent_sessions_opened_total", (("transport", "webrtc"),))] == 1
    assert sum(v for (name, _), v in after.items() if name == "voice_agent_sessions_closed_total") == 1
    assert after[("voice_agent_refused_total", (("code", "invalid_json"),))] == 1
    assert ("voice_agent_output_late_frames_total", ()) in after


async def test_metrics_need_the_token_when_one_is_set(start_server):
    server = await start_server(auth_token="s3cret")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/metrics") as response:
            assert response.status == 401
    samples = await scrape(server.url, {"Authorization": "Bearer s3cret"})
    assert samples[("voice_agent_refused_total", (("code", "unauthorized"),))] == 1
