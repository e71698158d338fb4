"""`/v1/realtime`, driven by the official `openai` SDK: its realtime client pointed at this server.
Every event the server sends in a scripted session is checked against the SDK's typed server-event
models, strictly: each must parse, and carry no field the models do not declare."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, AsyncIterator

import aiohttp
import numpy as np
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import BaseModel, TypeAdapter

from config import TurnConfig
from context.dialog import DialogContext, TranscriptStore
from controller.controller import Controller, SessionModels
from realtime.events import EventError, FunctionCallArgumentsDone, ResponseCreated, ResponseDone, ResponseOrder, ResponseTextDelta, SpeechStopped, TranscriptionDelta
from realtime.openai_realtime import Translator
from realtime.openai_session import turn_detection_to_ours
from realtime.session import SessionIO
from testkit.notifier import Notifier
from tests.fakes import CountingTokenizer, CuedLM, ScriptedDetector, ToneDecoder
from tools.builtin import current_time
from tools.toolbox import Toolbox, tool_from_function
from turns.judge import TurnEndScorers

pytestmark = pytest.mark.unit

SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
# OpenAI's own server sends the session's `id` and `object` in session.created / .updated; the
# SDK types that session as the request it answers, which has neither. Nothing else is let through.
SESSION_FIELDS_BEYOND_THE_SDK = {"session.id", "session.object"}
RATE = 24000


def client(url: str, token: str = "unused") -> AsyncOpenAI:
    """The SDK as an app would set it up for another server: its base URL and key."""
    return AsyncOpenAI(api_key=token, base_url=f"{url}/v1", websocket_base_url=f"{url.replace('http', 'ws', 1)}/v1")


async def next_of(connection: Any, kind: str, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        async for event in connection:
            if event.type == kind:
                return event
    raise AssertionError(f"the connection ended before a {kind}")


def _extras(model: BaseModel, path: str) -> list[str]:
    found = [f"{path}{key}" for key in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for inner in value if isinstance(value, list) else [value]:
            if isinstance(inner, BaseModel):
                found += _extras(inner, f"{path}{name}.")
    return found


def strictly(message: dict[str, Any]) -> Any:
    """`message` as the SDK's typed server event; fails on a missing or wrong field, and on a field
    the type does not declare."""
    event = SERVER_EVENT.validate_python(message)
    allowed = SESSION_FIELDS_BEYOND_THE_SDK if event.type in ("session.created", "session.updated") else set()
    extra = set(_extras(event, "")) - allowed
    assert not extra, f"{event.type}: fields the SDK does not declare: {sorted(extra)} in {message}"
    return event


# ---- the mapping, one event at a time ------------------------------------------------------------


def test_turn_detection_maps_to_ours_for_any_values_ga_accepts():
    ga = {"type": "server_vad", "threshold": 0.6, "prefix_padding_ms": 300, "silence_duration_ms": 200}
    assert turn_detection_to_ours(ga) == {
        "type": "vad", "threshold": 0.6, "prefix_padding_ms": 300, "commit_ms": 200, "pause_ms": 150, "idle_timeout_ms": 0,
    }
    tiny = turn_detection_to_ours({**ga, "threshold": 0.99, "silence_duration_ms": 0, "prefix_padding_ms": 5000, "idle_timeout_ms": 6000})
    assert tiny == {"type": "vad", "threshold": 0.95, "prefix_padding_ms": 2000, "commit_ms": 100, "pause_ms": 60, "idle_timeout_ms": 6000}
    TurnConfig().updated({k: v for k, v in tiny.items()})  # ours takes every value the mapping gives
    assert turn_detection_to_ours({"type": "semantic_vad", "eagerness": "auto"}) == {"type": "semantic", "eagerness": "medium"}
    assert turn_detection_to_ours(None) == {"type": "manual"}
    for bad in ("x", {"type": "push_to_talk"}, {**ga, "threshold": "high"}):
        with pytest.raises(EventError):
            turn_detection_to_ours(bad)


def test_a_reply_s_events_are_the_ga_lifecycle_and_each_parses_strictly():
    translator = Translator("m")
    out = [*translator.server(SpeechStopped("item_u1", 900))]
    out += translator.server(TranscriptionDelta("item_u1", "What is"))
    out += translator.server(TranscriptionDelta("item_u1", "What was"))  # ours rewrote it; theirs cannot
    out += translator.server(ResponseCreated("resp_1", ResponseOrder(metadata={"topic": "t"})))
    out += translator.server(ResponseTextDelta("resp_1", "Paris"))
    out += translator.server(FunctionCallArgumentsDone("resp_1", "resp_1-call1", "call_a", "current_time", "{}"))
    out += translator.server(ResponseDone("resp_1", "interrupted", "Paris is"))
    events = [strictly({"event_id": f"e{i}", **m}) for i, m in enumerate(out)]
    assert [e.type for e in events] == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
        "conversation.item.input_audio_transcription.delta",
        "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_audio_transcript.delta",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "conversation.item.done",
        "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
    ]
    done = events[-1].response
    assert (done.status, done.status_details.reason, done.metadata) == ("cancelled", "turn_detected", {"topic": "t"})
    assert [o.type for o in done.output] == ["message", "function_call"] and done.output[0].content[0].transcript == "Paris is"
    assert events[7].previous_item_id == "item_u1" and events[7].item.id == "item_1"


# ---- a whole session, over the socket ----------------------------------------------------------


class Scripted:
    """The agents of a server whose engines are the controller tests' stand-ins: speech wherever
    the audio is not silent, each utterance transcribed as `transcript`, the LM's reply cued."""

    def __init__(self, store: TranscriptStore | None = None) -> None:
        self.store = store  # where each session's transcript is written, if anywhere
        self.notifier = Notifier()
        self.tokenizer = CountingTokenizer(self.notifier)
        self.lm = CuedLM(self.notifier, reply="Here is a rather long answer that goes on for quite a while yet.")
        self.contexts: list[DialogContext] = []
        self.decoders: list[ToneDecoder] = []

    def __call__(self, io: SessionIO) -> Controller:
        tools = Toolbox([tool_from_function(current_time, 5)])
        judge = TurnEndScorers(text=self._finished)  # semantic_vad (openai-agents' default) judges with it
        self.decoders.append(ToneDecoder(self.notifier, ms_per_word=150))
        models = SessionModels(ScriptedDetector(), self.tokenizer, self.lm, self.decoders[-1], judge, tools)
        self.contexts.append(DialogContext("Be brief.", 500, self.store, io.session_id))
        return Controller(io, models, self.contexts[-1], TurnConfig(), "scripted")

    @staticmethod
    async def _finished(text: str) -> float:
        return 1.0


def speech(seconds: float, voiced: bool) -> str:
    return base64.b64encode(np.full(round(RATE * seconds), 3000 if voiced else 0, "<i2").tobytes()).decode()


class Recorder:
    """Every event of a connection, checked strictly as it comes."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self.events: list[Any] = []

    async def until(self, kind: str, timeout: float = 15, after: int = 0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                found = [e for e in self.events[after:] if e.type == kind]
                if found:
                    return found[0]
                message = await self.socket.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, message
                self.events.append(strictly(json.loads(message.data)))

    async def send(self, **message: Any) -> None:
        await self.socket.send_json(message)


@pytest.fixture
async def scripted(start_server) -> AsyncIterator[tuple[Recorder, Scripted]]:
    agents = Scripted()
    server = await start_server(factory=agents, echo_cancel="off")
    url = server.url.replace("http", "ws", 1) + "/v1/realtime?model=scripted"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as socket:
        yield Recorder(socket), agents


async def test_every_event_of_a_scripted_session_is_the_sdks_type_strictly(scripted):
    """Speech answered, a typed item and a system item added without a reply, a reply asked for
    out of band with its own instructions and metadata, a tool call, barge-in, cancel, truncate,
    retrieve and delete: each event parses strictly, in GA's order."""
    peer, agents = scripted
    created = await peer.until("session.created")
    assert created.session.audio.input.turn_detection.type == "server_vad"  # GA's default, not our semantic
    await peer.send(type="session.update", session={
        "type": "realtime", "instructions": "Speak like a pirate.",
        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 200}}, "output": {"voice": "marin"}},
    })
    updated = await peer.until("session.updated")
    assert updated.session.instructions == "Speak like a pirate." and updated.session.audio.output.voice == "marin"
    assert updated.session.audio.input.turn_detection.silence_duration_ms == 200
    assert agents.contexts[0].system_prompt == "Speak like a pirate."

    # Spoken: speech, then silence past the 200 ms commit.
    agents.tokenizer.transcript = "What is the capital of France?"
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.5, False))
    completed = await peer.until("conversation.item.input_audio_transcription.completed")
    assert completed.usage.type == "duration" and completed.usage.seconds > 0.5
    done = await peer.until("response.done", timeout=30)
    assert done.response.status == "completed"
    kinds = [e.type for e in peer.events]
    assert kinds.index("input_audio_buffer.committed") < kinds.index("conversation.item.added") < kinds.index("response.created")
    assert agents.lm.calls[-1][0].content == "Speak like a pirate."

    # Items of every role join the history without a reply; a reply comes when asked for.
    mark = len(peer.events)
    await peer.send(type="conversation.item.create", item={"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Be terse."}]})
    await peer.send(type="conversation.item.create", item={"id": "typed_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "And of Spain?"}]})
    added = await peer.until("conversation.item.done", after=mark + 2)
    assert added.item.id == "typed_1" and added.previous_item_id is not None
    assert not any(e.type == "response.created" for e in peer.events[mark:])
    await peer.send(type="response.create", response={"conversation": "none", "instructions": "Answer in one word.", "metadata": {"purpose": "summary"}})
    oob = await peer.until("response.created", after=mark)
    assert oob.response.metadata == {"purpose": "summary"} and oob.response.conversation_id is None
    assert [m.content for m in agents.lm.calls[-1]][0] == "Answer in one word." and agents.lm.calls[-1][-1].content == "And of Spain?"
    await peer.until("response.done", timeout=30, after=mark)
    assert not any(e.type == "conversation.item.added" and e.item.role == "assistant" for e in peer.events[mark:])
    assert [t.text for t in agents.contexts[0].turns][-2:] == ["Be terse.", "And of Spain?"]  # out of band: not kept

    # A tool call, the server's own: announced as an output item, its output a conversation item.
    mark = len(peer.events)
    agents.tokenizer.transcript = "What time is it?"
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.5, False))
    call = await peer.until("response.function_call_arguments.done", after=mark)
    output = await peer.until("conversation.item.done", after=len(peer.events) - 1, timeout=15)
    while output.item.type != "function_call_output":
        output = await peer.until("conversation.item.done", after=peer.events.index(output) + 1)
    assert output.item.call_id == call.call_id
    await peer.until("response.done", timeout=30, after=mark)

    # Barge-in: speech over the reply ends it, cancelled for turn_detected, the history cut to what was heard.
    mark = len(peer.events)
    agents.tokenizer.transcript = "Tell me more."
    await peer.send(type="response.create")
    await peer.until("response.output_audio.delta", after=mark)
    for _ in range(2):  # 1.5 s, over the held reply's backchannel limit: a turn
        await peer.send(type="input_audio_buffer.append", audio=speech(0.75, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.5, False))
    interrupted = await peer.until("response.done", after=mark)
    assert interrupted.response.status == "cancelled" and interrupted.response.status_details.reason == "turn_detected"

    # Cancel, truncate, retrieve, delete.
    answer = await peer.until("response.created", after=peer.events.index(interrupted) + 1)
    await peer.until("response.output_audio.delta", after=peer.events.index(answer))
    await peer.send(type="response.cancel")
    cancelled = await peer.until("response.done", after=peer.events.index(answer))
    assert cancelled.response.status_details.reason == "client_cancelled"
    item_id = cancelled.response.output[0].id
    await peer.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
    assert (await peer.until("conversation.item.truncated", after=peer.events.index(cancelled))).item_id == item_id
    mark = len(peer.events)
    await peer.send(type="conversation.item.retrieve", item_id="typed_1")
    retrieved = await peer.until("conversation.item.retrieved", after=mark)
    assert retrieved.item.content[0].text == "And of Spain?"
    await peer.send(type="conversation.item.delete", item_id="typed_1")
    assert (await peer.until("conversation.item.deleted", after=mark)).item_id == "typed_1"
    assert all(t.item_id != "typed_1" for t in agents.contexts[0].turns)
    await peer.send(type="conversation.item.retrieve", item_id="typed_1")
    assert (await peer.until("error", after=mark)).error.code == "item_not_found"
    await peer.send(type="input_audio_buffer.clear")
    await peer.until("input_audio_buffer.cleared", after=mark)


async def test_create_response_off_keeps_the_turn_and_waits_to_be_asked(scripted):
    peer, agents = scripted
    await peer.until("session.created")
    await peer.send(type="session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "silence_duration_ms": 300, "create_response": False, "interrupt_response": False}}}})
    await peer.until("session.updated")
    agents.tokenizer.transcript = "Remember the number seven."
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.6, False))
    completed = await peer.until("conversation.item.input_audio_transcription.completed")
    assert completed.transcript == "Remember the number seven."
    assert not any(e.type == "response.created" for e in peer.events) and not agents.lm.calls
    await peer.send(type="response.create")
    await peer.until("response.output_audio.delta")
    assert agents.lm.calls[-1][-1].content == "Remember the number seven."
    # interrupt_response off: speech over the reply neither stops it nor makes a turn.
    mark = len(peer.events)
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.6, False))
    done = await peer.until("response.done", timeout=30)
    assert done.response.status == "completed"
    assert not any(e.type == "input_audio_buffer.speech_started" for e in peer.events[mark:])
    await peer.send(type="response.create")
    assert (await peer.until("response.created", after=peer.events.index(done))).type == "response.created"
    await peer.send(type="response.create")
    assert (await peer.until("error", after=peer.events.index(done))).error.code == "conversation_already_has_active_response"


# ---- the SDK itself ----------------------------------------------------------------------------


async def test_the_sdk_connects_and_bad_messages_get_errors(server):
    async with client(server.url).realtime.connect(model="loopback") as connection:
        created = await next_of(connection, "session.created")
        assert created.session.audio.input.format.rate == 24000
        await connection.send({"type": "conversation.item.truncate", "item_id": "", "content_index": 0, "audio_end_ms": 5})
        error = await next_of(connection, "error")
        assert error.error.code == "invalid_value"
        await connection.input_audio_buffer.commit()  # the loopback profile makes no turns
        assert (await next_of(connection, "error")).error.code == "unsupported"
        await connection.input_audio_buffer.append(audio="not base64!")
        assert (await next_of(connection, "error")).error.code == "invalid_value"
        await connection.input_audio_buffer.append(audio=base64.b64encode(b"\x00\x01\x02").decode())
        assert (await next_of(connection, "error")).error.code == "invalid_audio"
        # Audio that is fine goes in: 400 ms at 24 kHz, then a bad message whose error says it was read.
        await connection.input_audio_buffer.append(audio=base64.b64encode(np.zeros(9600, "<i2").tobytes()).decode())
        await connection.send({"type": "no.such.event"})
        assert (await next_of(connection, "error")).error.code == "unknown_event"
        session = next(iter(server.registry))
        assert session.transport == "openai-realtime" and session.frames_received >= 10


async def test_the_token_is_the_api_key(start_server):
    server = await start_server(auth_token="s3cret")
    async with client(server.url, "s3cret").realtime.connect(model="loopback") as connection:
        await next_of(connection, "session.created")
    with pytest.raises(Exception):
        async with client(server.url, "wrong").realtime.connect(model="loopback") as connection:
            await next_of(connection, "session.created")


async def test_garbage_on_the_socket_gets_errors_and_the_session_stays(server):
    url = server.url.replace("http", "ws", 1) + "/v1/realtime?model=loopback"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
        bad = ["[" * 100_000 + "]" * 100_000, "{nope", "[1, 2]", '{"type": 5}', json.dumps({"type": "x" * 100_000})]
        for text in bad:
            await ws.send_str(text)
        await ws.send_bytes(b"\x00\x01")
        codes = []
        while len(codes) < len(bad) + 1:
            event = await ws.receive_json(timeout=5)
            if event["type"] == "error":
                codes.append(event["error"]["code"])
        assert codes == ["invalid_json", "invalid_json", "invalid_event", "invalid_event", "unknown_event", "invalid_event"]
        assert len(server.registry) == 1 and not ws.closed


async def test_idle_timeout_ms_asks_whether_the_user_is_still_there(scripted):
    peer, agents = scripted
    await peer.until("session.created")
    await peer.send(type="session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": {
        "type": "server_vad", "silence_duration_ms": 300, "idle_timeout_ms": 1000}}}})
    assert (await peer.until("session.updated")).session.audio.input.turn_detection.idle_timeout_ms == 1000
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.6, False))
    answered = await peer.until("response.done", timeout=30)
    await peer.send(type="input_audio_buffer.append", audio=speech(0.9, False))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.2, False))
    idle = await peer.until("input_audio_buffer.timeout_triggered", after=peer.events.index(answered))
    assert idle.audio_end_ms - idle.audio_start_ms == 1000
    asked = await peer.until("response.done", timeout=30, after=peer.events.index(idle))
    assert asked.response.output[0].content[0].transcript == "Are you still there?"


async def test_a_text_only_session_gets_the_reply_s_text_and_no_speech_is_made(scripted):
    peer, agents = scripted
    await peer.until("session.created")
    await peer.send(type="session.update", session={"type": "realtime", "output_modalities": ["text"]})
    assert (await peer.until("session.updated")).session.output_modalities == ["text"]
    await peer.send(type="input_audio_buffer.append", audio=speech(1.0, True))
    await peer.send(type="input_audio_buffer.append", audio=speech(0.6, False))
    done = await peer.until("response.done", timeout=30)
    assert done.response.output[0].content[0].text == agents.lm.reply
    kinds = {e.type for e in peer.events}
    assert "response.output_text.delta" in kinds and not kinds & {"response.output_audio.delta", "response.output_audio_transcript.delta"}
    assert agents.decoders[0].chunks == 0  # nothing synthesized
