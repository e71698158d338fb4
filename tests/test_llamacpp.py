"""The embedded LM in llama.cpp, on the real SmolLM2 GGUF: parallel slots, prompt reuse, cancel."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from models.base import Message
from models.llamacpp_lm import LlamaCppLM
from profiles.embedded import smollm2_gguf
from runtime.workers import ModelWorker
from testkit.notifier import Notifier

pytestmark = pytest.mark.models

SYSTEM = Message("system", "You are a friendly voice assistant. Answer in one or two short sentences.")


@pytest.fixture(scope="module")
def lm():
    worker = ModelWorker("llamacpp-test", threads=4)
    model = worker.submit(LlamaCppLM, smollm2_gguf(), worker, 40, 0.0, 2, 4).result()
    yield model
    worker.close()
    asyncio.run(model.aclose())


async def _reply(lm: LlamaCppLM, messages: list[Message], marks: dict[str, float], tag: str, tokens: int = 40) -> str:
    text = ""
    async with aclosing(lm.stream(messages, tokens)) as deltas:
        async for delta in deltas:
            marks.setdefault(f"{tag}_first", time.monotonic())
            text += delta
    marks[f"{tag}_done"] = time.monotonic()
    return text


async def test_two_calls_generate_at_the_same_time(lm):
    marks: dict[str, float] = {}
    story = [SYSTEM, Message("user", "Tell me a long story about a dragon and a knight.")]
    question = [SYSTEM, Message("user", "What colour is the sky?")]
    long, short = await asyncio.gather(_reply(lm, story, marks, "a", 40), _reply(lm, question, marks, "b", 40))
    assert long.strip() and short.strip()
    # Neither waited for the other to finish: each had started before the other was done.
    assert marks["a_first"] < marks["b_done"] and marks["b_first"] < marks["a_done"], marks


async def test_a_turn_read_ahead_leaves_only_its_end_to_evaluate(lm):
    """The start of a long turn, prefilled while the user goes on: the reply's prompt then
    evaluates only what the user said after it (and the chat template's few tokens)."""
    start = "I went to the market this morning to buy apples, pears and a loaf of bread for the week,"
    end = " but they had sold out of bread, so what else could I bake at home?"
    history = [SYSTEM, Message("user", "Hello there."), Message("assistant", "Hello! How can I help?")]
    await _reply(lm, [SYSTEM, Message("user", "Something else entirely.")], {}, "other")  # the slot holds another prompt
    await lm.prefill([*history, Message("user", start)])
    read_ahead = lm.last_prompt.cached + lm.last_prompt.evaluated
    await _reply(lm, [*history, Message("user", start + end)], {}, "reply")
    use = lm.last_prompt
    assert use.cached >= read_ahead - 8, (use, read_ahead)  # all but the template's end of a user turn
    assert use.evaluated <= len(end.split()) * 2 + 8, use


async def test_the_next_turn_evaluates_only_the_new_tokens(lm):
    first = [SYSTEM, Message("user", "What is the capital of France?")]
    reply = await _reply(lm, first, {}, "first")
    first_prompt = lm.last_prompt.cached + lm.last_prompt.evaluated
    second = [*first, Message("assistant", reply), Message("user", "And what is the capital of Germany?")]
    await _reply(lm, second, {}, "second")
    use = lm.last_prompt
    # Everything up to the end of the first prompt came from the slot's cache; only the reply and
    # the new question went through the model.
    assert use.cached >= first_prompt - 1, use
    assert 0 < use.evaluated <= use.cached + use.evaluated - first_prompt + 1, use


async def test_closing_the_stream_stops_generation_within_a_token(lm, monkeypatch):
    notifier = Notifier()
    loop = asyncio.get_running_loop()
    generated: list[int] = []
    original = lm.generate_now

    def counting(request, post, stop):
        count = 0

        def post_counted(delta):
            nonlocal count
            count += 1
            post(delta)

        try:
            original(request, post_counted, stop)
        finally:
            generated.append(count)
            loop.call_soon_threadsafe(notifier.notify)

    monkeypatch.setattr(lm, "generate_now", counting)
    story = [SYSTEM, Message("user", "Tell me a very long story about the sea, with many details.")]
    received = 0
    async with aclosing(lm.stream(story, 200)) as deltas:
        async for _ in deltas:
            received += 1
            if received == 3:
                break
    await notifier.wait_for(lambda: generated, timeout=10)
    assert generated[0] <= received + 1, generated  # stopped at the next token, not at 200


async def test_slots_filled_at_start_up_hold_the_system_prompt_for_any_new_call():
    """Filled at start-up, the slots (and llama.cpp's prompt cache in memory behind them) hold the
    system prompt: three calls at once each find it cached; on a fresh LM, none does."""
    from profiles.warm_up import fill_slots

    worker = ModelWorker("lm-slots", threads=3)  # one thread waits on each generation in flight
    questions = ("Is it cold outside?", "What is the capital of Spain?", "How far is the sun?")

    async def three_calls(filled: bool) -> list[int]:
        lm = await worker.run(LlamaCppLM, smollm2_gguf(), worker, 30, 0.0, 1, 3)
        uses: list[int] = []

        async def call(question: str) -> None:
            await _reply(lm, [SYSTEM, Message("user", question)], {}, question, tokens=2)
            uses.append(lm.last_prompt.cached)

        try:
            if filled:
                await fill_slots(lm, SYSTEM.content, 3)
            await asyncio.gather(*(call(q) for q in questions))
        finally:
            await lm.aclose()
        return uses

    try:
        assert await three_calls(filled=False) == [0, 0, 0]
        # Everything before the user's words (the system prompt in its chat template) was cached.
        warm = await three_calls(filled=True)
        assert len(warm) == 3 and min(warm) >= 20, warm
    finally:
        worker.close()
