"""`/v1/realtime` with another client library than the `openai` SDK: OpenAI's agents SDK
(`openai-agents`), driven by its public API (`RealtimeAgent`, `RealtimeRunner`, the session's
events and history), against the scripted server of `test_openai_realtime.py`."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from agents.realtime import RealtimeAgent, RealtimeRunner

from tests.test_openai_realtime import RATE, Scripted

pytestmark = pytest.mark.unit


def pcm(seconds: float, voiced: bool) -> bytes:
    return np.full(round(RATE * seconds), 3000 if voiced else 0, "<i2").tobytes()


def _user_transcripts(history: list[Any]) -> list[str | None]:
    return [getattr(part, "transcript", None) for item in history if getattr(item, "role", None) == "user" for part in item.content]


def _assistant_texts(history: list[Any]) -> list[tuple[str, str | None]]:
    return [
        (item.status, getattr(part, "transcript", None) or getattr(part, "text", None))
        for item in history
        if getattr(item, "role", None) == "assistant"
        for part in item.content
    ]


async def microphone(session: Any, said: asyncio.Queue[float]) -> None:
    """A microphone into the agents SDK's session, in real time: 100 ms a send, silence between the
    stretches of speech put on `said` (in seconds)."""
    speech_left = 0.0
    while True:
        if speech_left <= 0 and not said.empty():
            speech_left = said.get_nowait()
        await session.send_audio(pcm(0.1, speech_left > 0))
        speech_left -= 0.1
        await asyncio.sleep(0.1)  # pacing the microphone, not waiting for an event


async def test_the_agents_sdk_holds_a_spoken_conversation_with_transcripts_in_its_history(start_server):
    agents = Scripted()
    server = await start_server(factory=agents, echo_cancel="off")
    url = server.url.replace("http", "ws", 1) + "/v1/realtime?model=scripted"
    runner = RealtimeRunner(RealtimeAgent(name="assistant", instructions="Answer in one short sentence."))
    session = await runner.run(model_config={"url": url, "api_key": "unused"})
    kinds: list[str] = []
    errors: list[Any] = []
    history: list[Any] = []
    audio = 0

    async def until(done: Any) -> None:
        nonlocal audio
        async with asyncio.timeout(30):
            async for event in session:
                kinds.append(event.type)
                if event.type == "error":
                    errors.append(event.error)
                elif event.type == "audio":
                    audio += len(event.audio.data)
                elif event.type == "history_updated":
                    history[:] = event.history
                if done():
                    return

    said: asyncio.Queue[float] = asyncio.Queue()
    async with session, asyncio.TaskGroup() as group:
        mic = group.create_task(microphone(session, said))
        for turn, question in enumerate(("What is the capital of France?", "And of Spain?"), start=1):
            agents.tokenizer.transcript = question
            said.put_nowait(1.0)
            await until(lambda: [s for s, text in _assistant_texts(history) if s == "completed" and text] == ["completed"] * turn)
        mic.cancel()
    assert not errors, errors
    assert audio > RATE * 2  # bytes of the agent's speech, PCM16: over a second of it
    # Each user turn is in the SDK's history with its transcript (GA's `usage` made it parse).
    assert _user_transcripts(history) == ["What is the capital of France?", "And of Spain?"]
    assert [text for _, text in _assistant_texts(history)] == [agents.lm.reply] * 2
    # The agent's instructions became the session's system prompt.
    assert agents.lm.calls[-1][0].content == "Answer in one short sentence."
    assert "agent_start" in kinds and "audio_end" in kinds
