"""Access control beyond localhost: the bearer token, the browser's origin, the offer rate."""

from __future__ import annotations

import json

import aiohttp
import pytest

from realtime.access import OfferRate
from testkit.peer import ClientPeer

pytestmark = pytest.mark.unit

BAD_OFFER = {"sdp": 5, "type": "offer"}  # reaches the handler, which refuses it (400)


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kwargs) -> tuple[int, str | None]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body.get("error", {}).get("code")


async def test_with_a_token_the_api_needs_it_and_the_page_stays_open(start_server):
    server = await start_server(auth_token="s3cret")
    bearer = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as http:
        for path in ("/api/config", "/api/sessions/sess_x/transcript", "/ws"):
            assert await status_of(http, "GET", server.url + path) == (401, "unauthorized"), path
            assert await status_of(http, "GET", server.url + path, headers={"Authorization": "Bearer nope"}) == (401, "unauthorized")
        assert (await status_of(http, "GET", server.url + "/api/config", headers=bearer))[0] == 200
        assert await status_of(http, "GET", server.url + "/api/sessions/sess_x/transcript", headers=bearer) == (404, "not_found")
        assert (await status_of(http, "GET", server.url + "/healthz"))[0] == 200
        async with http.get(server.url + "/") as page:
            assert page.status == 200
        # A browser's WebSocket cannot set headers: the token comes in the query.
        async with http.ws_connect(f"{server.url}/ws?token=s3cret") as ws:
            await ws.send_str(json.dumps({"type": "session.start", "input_sample_rate": 16000}))
            created = await ws.receive_json(timeout=5)
            assert created["type"] == "session.created"
    # The whole WebRTC call works with it.
    peer = ClientPeer(server.url, headers=bearer)
    await peer.connect()
    await peer.wait_event("session.created")
    await peer.close()


async def test_pages_of_other_origins_may_not_call(start_server):
    server = await start_server(allowed_origins=("https://app.example.com",))
    offer = f"{server.url}/api/offer"
    host = server.url.removeprefix("http://")
    async with aiohttp.ClientSession() as http:
        assert await status_of(http, "POST", offer, json=BAD_OFFER, headers={"Origin": "https://evil.example"}) == (
            403, "forbidden_origin"
        )
        for origin in (f"http://{host}", "https://app.example.com", None):
            headers = {"Origin": origin} if origin else {}
            assert await status_of(http, "POST", offer, json=BAD_OFFER, headers=headers) == (400, "invalid_offer"), origin
        assert await status_of(http, "GET", f"{server.url}/ws", headers={"Origin": "https://evil.example"}) == (
            403, "forbidden_origin"
        )


async def test_one_address_may_offer_only_so_often(start_server):
    server = await start_server(offers_per_minute=3)
    async with aiohttp.ClientSession() as http:
        codes = [await status_of(http, "POST", f"{server.url}/api/offer", json=BAD_OFFER) for _ in range(5)]
    assert codes == [(400, "invalid_offer")] * 3 + [(429, "too_many_offers")] * 2


def test_the_offer_rate_is_a_sliding_minute():
    now = [0.0]
    rate = OfferRate(2, clock=lambda: now[0])
    assert [rate.allow("a"), rate.allow("a"), rate.allow("a"), rate.allow("b")] == [True, True, False, True]
    now[0] = 59.9
    assert not rate.allow("a")
    now[0] = 60.0  # both left the window
    assert [rate.allow("a"), rate.allow("a"), rate.allow("a")] == [True, True, False]
