"""Mutated SDP offers (lines dropped, doubled, swapped, cut, garbled): each one is answered 200 or a
clear 400, nothing is left failing in the background, no session outlives its connect timeout,
and a real call afterwards works."""

from __future__ import annotations

import asyncio
import random
import string
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from realtime.session import SessionRegistry
from testkit.peer import ClientPeer
from tests.signals import speechlike

pytestmark = pytest.mark.unit

CASES = 100


async def real_offer() -> str:
    pc = RTCPeerConnection()
    pc.createDataChannel("events")
    pc.addTransceiver("audio")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def garble(rng: random.Random, text: str) -> str:
    return rng.choice(
        [
            "",
            "0",
            "-1",
            "99999999999999999999",
            "".join(rng.choices(string.printable, k=rng.randint(1, 40))),
            text[::-1],
            text * 3,
        ]
    )


def mutate(rng: random.Random, sdp: str) -> str:
    lines = sdp.split("\r\n")[:-1]
    for _ in range(rng.randint(1, 3)):
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        kind = rng.choice(["drop", "double", "swap", "token", "value", "cut"])
        if kind == "drop":
            del lines[i]
        elif kind == "double":
            lines.insert(j, lines[i])
        elif kind == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "token":
            tokens = lines[i].split(" ")
            k = rng.randrange(len(tokens))
            tokens[k] = garble(rng, tokens[k])
            lines[i] = " ".join(tokens)
        elif kind == "value":
            key, _, value = lines[i].partition(":")
            lines[i] = f"{key}:{garble(rng, value)}"
        else:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        if not lines:
            break
    return "\r\n".join(lines) + "\r\n"


async def all_closed(registry: SessionRegistry) -> None:
    for session in list(registry):
        await asyncio.wait_for(session.closed.wait(), 10)
    assert len(registry) == 0


async def test_mutated_offers_are_answered_or_refused_cleanly(start_server):
    server = await start_server(connect_timeout_s=0.5, max_sessions=CASES, offers_per_minute=1000, pending_offers_per_address=CASES)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    rng = random.Random(20261125)
    sdp = await real_offer()
    statuses: dict[int, int] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(CASES):
                async with http.post(f"{server.url}/api/offer", json={"sdp": mutate(rng, sdp), "type": "offer"}) as response:
                    body = await response.json()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                    assert response.status in (200, 400), body
                    if response.status == 400:
                        assert body["error"]["code"] == "invalid_sdp", body
        # Answered offers never connect: each is closed at its connect timeout, and leaves nothing.
        await all_closed(server.registry)
        assert statuses.get(400, 0) > 10 and statuses.get(200, 0) > 0, statuses  # the mutations did hit both

        peer = ClientPeer(server.url)
        try:
            await peer.connect()
            await peer.changed.wait_for(lambda: peer.received, timeout=5)
            peer.speak(speechlike(1.0, 48000), 48000)
            await peer.wait_audio(voiced_seconds=0.5, timeout=10)
        finally:
            await peer.close()
        await all_closed(server.registry)
    finally:
        loop.set_exception_handler(previous)
    assert unhandled == [], [c.get("message") for c in unhandled]


async def test_an_offer_from_before_bundle_is_still_answered(server):
    """No a=mid and no BUNDLE group (older gateways): not refused by the checks above."""
    offer = await real_offer()
    legacy = "\r\n".join(line for line in offer.split("\r\n") if not line.startswith(("a=mid:", "a=group:BUNDLE")))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/offer", json={"sdp": legacy, "type": "offer"}) as response:
            body = await response.json()
    assert response.status == 200 and "m=audio" in body["sdp"], body
