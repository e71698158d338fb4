"""A crash loses no completed turn (SIGKILL right after a reply ends), and a shutdown (SIGTERM)
tells every call why it ends."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from runtime.procfs import process_tree
from realtime.webrtc import use_loopback_ice_only
from testkit.local import local_server
from testkit.peer import ClientPeer

@pytest.fixture(autouse=True)
def loopback_client() -> None:
    use_loopback_ice_only()  # the servers here listen on 127.0.0.1 only; so must this client


def ended(pid: int) -> asyncio.Future[None]:
    """Resolved when the process ends (its pidfd turns readable)."""
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(pid)
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        done.set_result(None)

    loop.add_reader(fd, readable)
    return done


def typed(text: str) -> dict:
    return {"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", "text": text}]}}


@pytest.mark.models
async def test_every_completed_turn_survives_a_sigkill(tmp_path):
    data_dir = str(tmp_path / "data")
    questions = ("What is the capital of France?", "And what is the capital of Italy?")
    async with local_server("embedded", "--data-dir", data_dir) as (url, pid):
        peer = ClientPeer(url)
        session_id = await peer.connect()
        replies = []
        for question in questions:
            peer.send(typed(question))
            done = await peer.wait_event("response.done", timeout=60, predicate=lambda e: e["response"]["id"] not in replies)
            replies.append(done["response"]["id"])
        piper = [member for member in process_tree(pid) if b"models.piper_voice" in Path(f"/proc/{member}/cmdline").read_bytes()]
        assert len(piper) == 1
        piper_ended = ended(piper[0])  # watched from before the kill: its pid cannot be reused meanwhile
        os.kill(pid, signal.SIGKILL)  # at once, with the last response.done just received
        await asyncio.wait_for(piper_ended, 10)  # its stdin closed with the server: it stops on its own
        answers = [e["response"]["output_text"] for e in peer.events if e["type"] == "response.done"]
        await peer.close()

    async with local_server("embedded", "--data-dir", data_dir) as (url, _):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/api/sessions/{session_id}/transcript") as response:
                assert response.status == 200
                turns = (await response.json())["turns"]
    assert [(t["role"], t["text"]) for t in turns] == [
        ("user", questions[0]), ("assistant", answers[0]), ("user", questions[1]), ("assistant", answers[1])
    ]
    assert all(t["status"] == "completed" for t in turns)


@pytest.mark.unit
async def test_sigterm_ends_every_call_with_a_last_event(tmp_path):
    async with local_server("loopback", "--data-dir", str(tmp_path / "data")) as (url, pid):
        peer = ClientPeer(url)
        await peer.connect()
        await peer.wait_event("session.created")
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{url}/ws") as ws:
                await ws.send_str(json.dumps({"type": "session.start", "input_sample_rate": 16000}))
                assert (await ws.receive_json(timeout=5))["type"] == "session.created"
                os.kill(pid, signal.SIGTERM)
                closed = await peer.wait_event("session.closed", timeout=10)
                assert closed["reason"] == "server_shutdown"
                async with asyncio.timeout(10):
                    async for message in ws:  # its audio, then the last event, then the close
                        if message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "session.closed":
                            assert json.loads(message.data)["reason"] == "server_shutdown"
                            break
                    else:
                        raise AssertionError("the WebSocket closed without session.closed")
        await peer.close()
