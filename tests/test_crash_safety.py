"""A crash loses no completed turn: the server is killed with SIGKILL right after a reply ends."""

from __future__ import annotations

import os
import signal

import aiohttp
import pytest

from bench.local import local_server
from bench.peer import ClientPeer

pytestmark = pytest.mark.models


def typed(text: str) -> dict:
    return {"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text", "text": text}]}}


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
        os.kill(pid, signal.SIGKILL)  # at once, with the last response.done just received
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
