"""Tool calls in a spoken conversation, end to end over WebRTC on the embedded profile's real
speech models: a scripted OpenAI-compatible LM that streams tool-call deltas, the user's tools
module (`tests/voice_tools.py`), and the built-in time tool answering a spoken question through
the rule on the real embedded LM."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
from dataclasses import replace

import pytest

from config import AppConfig, ServerConfig
from context.dialog import TranscriptStore
from models.openai_lm import OpenAICompatibleLM
from testkit.peer import ClientPeer
from testkit.speech import espeak
from tests import voice_tools
from tests.fakes import serve
from tests.test_embedded import RATE, agent_audio, trimmed
from tests.test_tools import ToolCallingServer

pytestmark = pytest.mark.models


@pytest.fixture
async def tool_agent(start_server, embedded_models, tmp_path):
    """start(lm_server=None, **models_config): the embedded profile with `tests.voice_tools` and
    the built-in tools; its LM the scripted server when one is given, else SmolLM2."""
    from profiles import open_profile

    runners, lms = [], []

    async def start(lm_server: ToolCallingServer | None = None, **overrides):
        models = embedded_models
        if lm_server is not None:
            runners.append(await serve(lm_server))
            lms.append(OpenAICompatibleLM(lm_server.url, "scripted", None, 60, 0.0))
            models = replace(embedded_models, lm=lms[-1])
        config = AppConfig(
            server=ServerConfig(data_dir=tmp_path / "data"),
            models=replace(embedded_models.config, tools="tests.voice_tools", **overrides),
        )
        profile = await open_profile(config, TranscriptStore(tmp_path / "data"), models=models)
        return await start_server(factory=profile.factory)

    voice_tools.CALLS.clear()
    yield start
    for lm in lms:
        await lm.aclose()
    for runner in runners:
        await runner.cleanup()


async def ask(tool_agent, lm: ToolCallingServer | None, question: str, **overrides) -> tuple[ClientPeer, str]:
    """A call to a fresh agent, the question spoken into it."""
    speech = trimmed(espeak(question, RATE))  # before the call: espeak blocks the shared event loop
    server = await tool_agent(lm, **overrides)
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    await peer.wait_event("session.created")
    await peer.changed.wait_for(lambda: peer.received, timeout=5)
    peer.speak(speech, RATE)
    return peer, session_id


def said(peer: ClientPeer, response_id: str) -> str:
    return "".join(e["delta"] for e in peer.events if e["type"] == "response.text.delta" and e["response_id"] == response_id)


def of_type(peer: ClientPeer, kind: str) -> list[dict]:
    return [e for e in peer.events if e["type"] == kind]


def answer_from_outputs(body: dict) -> list[dict]:
    """The scripted LM's second turn: it reads the tools' outputs and says them."""
    outputs = [json.loads(m["content"]) for m in body["messages"] if m["role"] == "tool"]
    order = next(o for o in outputs if "status" in o)
    total = next(o for o in outputs if "result" in o)
    text = f"Order {order['order_id']} has {order['status']} and arrives on {order['arrives']}. Two plus two is {total['result']}."
    return [{"content": piece} for piece in re.findall(r"\S+\s*", text)]


async def test_streamed_tool_calls_run_once_and_the_spoken_reply_says_their_results(tool_agent, whisper_engine):
    lm = ToolCallingServer()
    lm.script = lambda body: answer_from_outputs(body) if any(m["role"] == "tool" for m in body["messages"]) else lm.two_calls(body)
    peer, _ = await ask(tool_agent, lm, "Where is my order A17?")
    try:
        done = await peer.wait_event("response.done", timeout=90)
        await peer.changed.wait_for(lambda: peer.received[-1].arrival > done["_received"] + 0.5, timeout=5)
    finally:
        await peer.close()
    assert done["response"]["status"] == "completed"
    # Each tool ran once, with the arguments the LM streamed in pieces.
    assert voice_tools.CALLS == [("order_status", {"order_id": "A17", "detail": "short"})]
    announced = of_type(peer, "response.function_call_arguments.done")
    assert [(e["name"], json.loads(e["arguments"]), e["call_id"]) for e in announced] == [
        ("order_status", {"order_id": "A17"}, "call_a"),
        ("calculate", {"expression": "2 + 2"}, "call_b"),
    ]
    outputs = {e["item"]["call_id"]: json.loads(e["item"]["output"]) for e in of_type(peer, "conversation.item.created")}
    assert outputs["call_a"]["arrives"] == "Friday" and outputs["call_b"]["result"] == "4"
    # The LM got the calls and their outputs back, in order, and the reply says them.
    second = lm.requests[1]["messages"]
    assert [m["role"] for m in second[-3:]] == ["assistant", "tool", "tool"] and second[-3]["tool_calls"][0]["id"] == "call_a"
    text = said(peer, done["response"]["id"])
    # order_status took 1.2 s: the line was not silent meanwhile.
    assert text.startswith("Let me check. One moment. Order A17 has shipped and arrives on Friday."), text
    heard = await whisper_engine.transcribe(agent_audio(peer, done["_received"] - 30, done["_received"] + 0.5))
    assert "friday" in heard.lower() and "moment" in heard.lower(), heard


@pytest.mark.parametrize("after_s", [0.0, 0.7], ids=["continued-turn", "barge-in"])
async def test_an_interruption_during_a_tool_call_keeps_its_call_and_result_for_the_next_turn(tool_agent, tmp_path, after_s):
    """Speech at once continues the user's turn (they heard under 500 ms of "One moment."), later
    it is a barge-in: either way the reply ends while the tool runs, and its call and result reach
    the history once it returns."""
    lm = ToolCallingServer()

    def script(body: dict) -> list[dict]:
        if len(lm.requests) == 1:
            call = {"index": 0, "id": "call_m", "type": "function", "function": {"name": "slow_lookup", "arguments": '{"query": "the museum"}'}}
            return [{"tool_calls": [call]}]
        return [{"content": "Okay."}]

    lm.script = script
    voice_tools.ARCHIVE = asyncio.Event()
    interruption = trimmed(espeak("Wait, never mind that.", RATE))
    follow_up = trimmed(espeak("So what did you find?", RATE))
    peer, session_id = await ask(tool_agent, lm, "When was the museum founded?")
    try:
        announced = await peer.wait_event("response.function_call_arguments.done", timeout=60)
        started = await peer.wait_event("response.audio.started", timeout=10)  # "One moment." while it runs
        await peer.changed.wait_for(lambda: peer.received[-1].arrival > started["_received"] + after_s, timeout=5)
        peer.speak(interruption, RATE)
        done = await peer.wait_event("response.done", timeout=30)
        assert done["response"]["status"] == "interrupted"
        assert not of_type(peer, "conversation.item.created")  # the tool is still running
        voice_tools.ARCHIVE.set()
        output = await peer.wait_event("conversation.item.created", timeout=10)
        assert output["item"]["call_id"] == announced["call_id"] == "call_m" and "1850" in output["item"]["output"]
        await lm.wait_requests(2, timeout=30)  # the interruption's own turn
        await peer.wait_event("response.done", timeout=60, predicate=lambda e: e["_received"] > done["_received"])
        peer.speak(follow_up, RATE)
        third = await lm.wait_requests(3, timeout=60)
    finally:
        await peer.close()
    assert voice_tools.CALLS == [("slow_lookup", {"query": "the museum"})]
    roles = [(m["role"], m.get("tool_call_id") or "") for m in third["messages"]]
    at = roles.index(("tool", "call_m"))
    assert third["messages"][at - 1]["tool_calls"][0]["function"] == {"name": "slow_lookup", "arguments": '{"query": "the museum"}'}
    assert "1850" in third["messages"][at]["content"]
    stored = TranscriptStore(tmp_path / "data").read(session_id)
    assert {"function_call", "function_call_output"} <= {r["role"] for r in stored}


async def test_a_tool_that_fails_or_hangs_gets_a_spoken_apology_not_a_hang(tool_agent):
    lm = ToolCallingServer(reply="I could not reach the order system.")

    def script(body: dict) -> list[dict]:
        if any(m["role"] == "tool" for m in body["messages"]):
            return [{"content": lm.reply}]
        calls = [
            {"index": 0, "id": "call_x", "type": "function", "function": {"name": "broken_tool", "arguments": '{"x": 1}'}},
            {"index": 1, "id": "call_y", "type": "function", "function": {"name": "stuck_tool", "arguments": "{}"}},
        ]
        return [{"tool_calls": calls}]

    lm.script = script
    peer, _ = await ask(tool_agent, lm, "Check my order please.", tool_timeout_s=1.5)
    try:
        done = await peer.wait_event("response.done", timeout=60)
    finally:
        await peer.close()
    assert done["response"]["status"] == "completed"
    outputs = {e["item"]["call_id"]: e["item"]["output"] for e in of_type(peer, "conversation.item.created")}
    assert "back end unreachable" in outputs["call_x"] and "longer than 1.5 s" in outputs["call_y"]
    assert said(peer, done["response"]["id"]) == "One moment. Sorry, that didn't work. I could not reach the order system."


async def test_the_embedded_profile_tells_the_time_when_asked_aloud(tool_agent):
    asked = datetime.datetime.now()
    peer, _ = await ask(tool_agent, None, "What time is it?")  # SmolLM2 cannot call tools: the rule does
    try:
        done = await peer.wait_event("response.done", timeout=60)
        answered = datetime.datetime.now()
    finally:
        await peer.close()
    assert done["response"]["status"] == "completed"
    assert [e["name"] for e in of_type(peer, "response.function_call_arguments.done")] == ["current_time"]
    text = said(peer, done["response"]["id"])
    match = re.match(r"It's (\d{1,2}):(\d\d) (AM|PM) on", text)
    assert match, text
    hour, minute = int(match.group(1)) % 12 + (12 if match.group(3) == "PM" else 0), int(match.group(2))
    told = answered.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if told > answered:  # asked just before midnight
        told -= datetime.timedelta(days=1)
    # The minute it said is one the question and its answer spanned (so within a minute of either).
    assert asked.replace(second=0, microsecond=0) <= told <= answered, (text, asked, answered)
