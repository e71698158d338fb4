"""Integration: the WebSocket transport with PCM16 frames, through the loopback profile."""

from __future__ import annotations

import pytest

import asyncio
import base64
import json
import os
import socket
import struct
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from tests.signals import best_alignment, resample, speechlike

pytestmark = pytest.mark.unit


async def next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> dict:
    """The next JSON event, skipping the audio frames interleaved with it."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.TEXT:
                return json.loads(msg.data)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg


async def test_pcm_comes_back_over_the_websocket(server):
    rate_in, rate_out = 8000, 24000  # telephony in, another rate out: both converted by the server
    signal = speechlike(1.5, rate_in)
    received: list[np.ndarray] = []
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url}/ws") as ws:
            await ws.send_str(json.dumps({"type": "session.start", "input_sample_rate": rate_in,
                                          "output_sample_rate": rate_out}))
            created = await next_event(ws)
            assert created["type"] == "session.created"
            session = server.registry.get(created["session"]["id"])
            assert session.transport == "websocket"
            pcm = (signal * 32767).astype("<i2")
            step = rate_in // 50
            for i in range(0, len(pcm), step):
                await ws.send_bytes(pcm[i : i + step].tobytes())
            await ws.send_bytes(b"\x01\x02\x03")  # odd length: refused, session goes on
            async with asyncio.timeout(10):
                while len(received) < 150:  # 3 s of 20 ms frames
                    msg = await ws.receive()
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        assert len(msg.data) == 2 * rate_out // 50
                        received.append(np.frombuffer(msg.data, dtype="<i2").astype(np.float32) / 32768)
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(msg.data)
                        assert event["type"] == "error" and event["error"]["code"] == "invalid_audio"
    # PCM both ways, so the waveform itself must come back. The last 100 ms are left out: they sit in
    # the input resampler's filter until the next packet, which a live client always sends.
    reference = resample(signal, rate_in, rate_out)[: -rate_out // 10]
    score, _ = best_alignment(reference, np.concatenate(received))
    assert score > 0.99
    await asyncio.wait_for(session.closed.wait(), 5)
    assert len(server.registry) == 0 and not session.tasks


async def test_websocket_respects_the_session_limit(start_server):
    server = await start_server(max_sessions=1)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url}/ws") as ws:
            await ws.send_str(json.dumps({"type": "session.start", "input_sample_rate": 16000}))
            assert (await next_event(ws))["type"] == "session.created"
            async with http.get(f"{server.url}/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                              "Sec-WebSocket-Version": "13",
                                                              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
                assert r.status == 503
                assert (await r.json())["error"]["code"] == "session_limit"


async def test_a_session_start_past_the_limit_is_refused_clearly(start_server):
    # Both upgrades find room; the first session.start takes it, the second gets a clear refusal.
    server = await start_server(max_sessions=1)
    start = json.dumps({"type": "session.start", "input_sample_rate": 16000})
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{server.url}/ws") as first, http.ws_connect(f"{server.url}/ws") as second:
            await first.send_str(start)
            assert (await next_event(first))["type"] == "session.created"
            await second.send_str(start)
            assert (await next_event(second))["error"]["code"] == "session_limit"
            closing = await second.receive(timeout=5)
            assert (closing.type, second.close_code) == (aiohttp.WSMsgType.CLOSE, 1013)
            assert len(server.registry) == 1


async def raw_websocket(url: str, window_bytes: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client made by hand, with a small receive window: one that can stop reading
    altogether (aiohttp's own client keeps reading into its buffers)."""
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window_bytes)
    sock.connect((parts.hostname, parts.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame (RFC 6455)."""
    mask = os.urandom(4)
    size = len(payload)
    header = bytes([0x80 | opcode]) + (
        bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size)
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def server_frame(reader: asyncio.StreamReader) -> bytes:
    """The payload of the server's next frame (unmasked, final)."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(size)


async def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(start_server):
    server = await start_server(ws_send_queue_s=0.2)
    reader, writer = await raw_websocket(f"{server.url}/ws", window_bytes=4096)
    start = {"type": "session.start", "input_sample_rate": 16000, "output_sample_rate": 48000}
    writer.write(client_frame(0x1, json.dumps(start).encode()))
    created = json.loads(await asyncio.wait_for(server_frame(reader), 5))  # the last thing it reads
    session = server.registry.get(created["session"]["id"])
    silence = client_frame(0x2, bytes(640))
    async with asyncio.timeout(30):  # it keeps sending, 20 ms of audio at a time, and never reads
        while not session.closed.is_set():
            writer.write(silence)
            try:
                await asyncio.wait_for(session.closed.wait(), 0.02)
            except TimeoutError:
                pass
    assert session.close_reason == "client_too_slow"
    assert len(server.registry) == 0 and not session.tasks
    writer.close()
