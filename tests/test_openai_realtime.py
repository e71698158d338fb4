"""`/v1/realtime`, driven by the official `openai` SDK: its realtime client pointed at this server."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
from openai import AsyncOpenAI

from realtime.events import (
    ConversationItemCreated,
    FunctionCallArgumentsDone,
    ResponseCreated,
    ResponseDone,
    ResponseTextDelta,
    SpeechStopped,
    TranscriptionDelta,
)
from realtime.openai_realtime import Translator, turn_detection_to_ours
from realtime.events import EventError

pytestmark = pytest.mark.unit


def client(url: str, token: str = "unused") -> AsyncOpenAI:
    """The SDK as an app would set it up for another server: its base URL and key."""
    return AsyncOpenAI(api_key=token, base_url=f"{url}/v1", websocket_base_url=f"{url.replace('http', 'ws', 1)}/v1")


async def next_of(connection: Any, kind: str, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        async for event in connection:
            if event.type == kind:
                return event
    raise AssertionError(f"the connection ended before a {kind}")


def test_turn_detection_maps_to_ours():
    assert turn_detection_to_ours({"type": "server_vad", "silence_duration_ms": 600, "threshold": 0.6}) == {
        "type": "vad", "commit_ms": 600, "threshold": 0.6,
    }
    assert turn_detection_to_ours({"type": "semantic_vad", "eagerness": "auto"}) == {"type": "semantic", "eagerness": "medium"}
    assert turn_detection_to_ours(None) == {"type": "manual"}
    for bad in ("x", {"type": "push_to_talk"}):
        with pytest.raises(EventError):
            turn_detection_to_ours(bad)


def test_transcripts_become_appended_deltas_and_replies_end_with_their_item():
    translator = Translator("m")
    assert translator.server(TranscriptionDelta("item_1", "What is"))[0]["delta"] == "What is"
    assert translator.server(TranscriptionDelta("item_1", "What is the"))[0]["delta"] == " the"
    assert translator.server(TranscriptionDelta("item_1", "What was"))[0:] == []  # ours rewrote it; theirs cannot
    stopped = translator.server(SpeechStopped("item_1", 900))
    assert [e["type"] for e in stopped] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    done = translator.server(ResponseDone("resp_1", "interrupted", "Paris is"))
    assert [e["type"] for e in done][-1] == "response.done"
    assert done[-1]["response"]["status"] == "cancelled"
    assert done[-1]["response"]["output"][0]["content"][0]["transcript"] == "Paris is"


def test_function_calls_and_their_outputs_are_events_the_sdk_parses():
    from openai.types.realtime import ConversationItemCreatedEvent, ResponseFunctionCallArgumentsDoneEvent

    translator = Translator("m")
    call = FunctionCallArgumentsDone("resp_1", "resp_1-call1", "call_a", "current_time", "{}")
    (done,) = translator.server(call)
    parsed = ResponseFunctionCallArgumentsDoneEvent.model_validate({**done, "event_id": "e1"})
    assert (parsed.call_id, parsed.name, parsed.arguments, parsed.response_id) == ("call_a", "current_time", "{}", "resp_1")
    item = {"id": "resp_1-output2", "type": "function_call_output", "call_id": "call_a", "output": '{"time": "02:00"}'}
    (created,) = translator.server(ConversationItemCreated(item))
    parsed_item = ConversationItemCreatedEvent.model_validate({**created, "event_id": "e2"}).item
    assert (parsed_item.type, parsed_item.call_id, parsed_item.output) == ("function_call_output", "call_a", '{"time": "02:00"}')


def test_a_text_only_session_gets_text_events_and_no_audio():
    translator = Translator("m")
    translator.client('{"type": "session.update", "session": {"output_modalities": ["text"]}}')
    translator.server(ResponseCreated("resp_1"))
    assert translator.server(ResponseTextDelta("resp_1", "Paris"))[0]["type"] == "response.output_text.delta"
    assert translator.audio(b"\x00\x00") is None
    done = translator.server(ResponseDone("resp_1", "completed", "Paris."))
    assert [e["type"] for e in done] == ["response.output_text.done", "response.done"]
    assert done[-1]["response"]["output"][0]["content"] == [{"type": "output_text", "text": "Paris."}]
    with pytest.raises(EventError):
        translator.client('{"type": "session.update", "session": {"output_modalities": ["video"]}}')


async def test_the_sdk_connects_and_bad_messages_get_errors(server):
    async with client(server.url).realtime.connect(model="loopback") as connection:
        created = await next_of(connection, "session.created")
        assert created.session.audio.input.format.rate == 24000
        await connection.send({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": 5})
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
