"""The dialog context: token budget, heard text, and the transcript over HTTP."""

from __future__ import annotations

import pytest

import aiohttp

from context.dialog import DialogContext, TranscriptStore, Turn, estimate_tokens, heard_text

pytestmark = pytest.mark.unit


def test_budget_evicts_oldest_turns_and_always_keeps_the_system_prompt():
    context = DialogContext("You are a helpful voice agent.", max_tokens=40)
    for i in range(10):
        context.add(Turn("user", f"question number {i} about the weather"))
        context.add(Turn("assistant", f"answer number {i} is sunny"))
    messages = context.messages(pending_user="and tomorrow?")
    assert messages[0].role == "system" and messages[0].content == "You are a helpful voice agent."
    assert messages[-1].content == "and tomorrow?"
    assert messages[1].role == "user"  # never opens on an orphaned assistant turn
    assert sum(estimate_tokens(m.content) for m in messages) <= 40
    kept = [m.content for m in messages[1:-1]]
    assert kept[-1] == "answer number 9 is sunny" and "question number 0 about the weather" not in kept
    assert len(kept) < 20


def test_heard_text_cuts_inside_the_chunk_that_was_playing():
    chunks = [("Hello there.", 1000.0), ("The weather today is sunny and warm.", 2000.0)]
    assert heard_text(chunks, 0) == ""
    assert heard_text(chunks, 1000) == "Hello there."
    assert heard_text(chunks, 2000) == "Hello there. The weather today"
    assert heard_text(chunks, 10_000) == "Hello there. The weather today is sunny and warm."


async def test_transcript_endpoint_serves_what_was_stored(server):
    store = TranscriptStore(server.config.server.data_dir)
    context = DialogContext("sys", 100, store=store, session_id="sess_abc")
    context.add(Turn("user", "hi", item_id="item_1"))
    context.add(Turn("assistant", "hello", "interrupted", "resp_1"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/api/sessions/sess_abc/transcript") as response:
            body = await response.json()
            assert response.status == 200
        assert [(t["role"], t["text"], t["status"]) for t in body["turns"]] == [
            ("user", "hi", "completed"),
            ("assistant", "hello", "interrupted"),
        ]
        async with http.get(f"{server.url}/api/sessions/sess_none/transcript") as response:
            assert response.status == 404 and (await response.json())["error"]["code"] == "not_found"


def test_history_leaves_in_steps_so_the_prompt_keeps_its_beginning():
    context = DialogContext("sys", max_tokens=100)
    openings = []
    for i in range(30):
        context.add(Turn("user", f"question {i} is here"))
        context.add(Turn("assistant", f"answer {i} is there"))
        messages = context.messages(pending_user="next")
        assert sum(estimate_tokens(m.content) for m in messages) <= 100
        openings.append(messages[1].content)
    # Each eviction drops several turns at once, so the first kept turn changes rarely.
    changes = sum(1 for a, b in zip(openings, openings[1:]) if a != b)
    assert 0 < changes <= 30 // 3
    assert openings[-1] != "question 0 is here"
