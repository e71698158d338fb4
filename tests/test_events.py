"""Unit: client event validation and the chunking of large server events."""

from __future__ import annotations

import json

import pytest

from realtime.events import EventError
from realtime.wire import MAX_MESSAGE_BYTES, ChunkJoiner, EventEncoder, parse_client_event

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        ("[1, 2]", "invalid_event"),
        ('{"no_type": 1}', "invalid_event"),
        ('{"type": 5}', "invalid_event"),
        ('{"type": "launch.rockets"}', "unknown_event"),
        ('{"type": "session.update"}', "invalid_value"),
        ('{"type": "session.update", "session": []}', "invalid_value"),
        ('{"type": "playback.position", "position_ms": -1}', "invalid_value"),
        ('{"type": "playback.position", "position_ms": "12"}', "invalid_value"),
        ('{"type": "playback.position", "position_ms": true}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"role": "assistant", "content": []}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"content": [{"type": "input_text", "text": "  "}]}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"role": "tool", "content": [{"type": "input_text", "text": "x"}]}}', "invalid_value"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "x"}}', "invalid_value"),
        ('{"type": "response.create", "response": {"conversation": "other"}}', "invalid_value"),
        ('{"type": "response.create", "response": {"metadata": {"k": 1}}}', "invalid_value"),
        ('{"type": "conversation.item.retrieve"}', "invalid_value"),
        (json.dumps({"type": "ping", "pad": "x" * MAX_MESSAGE_BYTES}), "message_too_large"),
    ],
)
def test_bad_client_messages_are_refused_with_a_code(raw, code):
    with pytest.raises(EventError) as refused:
        parse_client_event(raw)
    assert refused.value.code == code
    assert refused.value.message


def test_good_client_messages_are_parsed():
    event = parse_client_event('{"type": "playback.position", "position_ms": 1520, "event_id": "e1"}')
    assert (event.type, event.data["position_ms"], event.event_id) == ("playback.position", 1520.0, "e1")
    item = parse_client_event(
        json.dumps({"type": "conversation.item.create",
                    "item": {"role": "user", "content": [{"type": "input_text", "text": "Hello "},
                                                          {"type": "input_text", "text": "there"}]}})
    )
    assert (item.item.kind, item.item.text, item.respond) == ("user", "Hello there", True)  # a typed turn: answered at once
    system = parse_client_event(json.dumps({"type": "conversation.item.create", "item": {
        "id": "sys_1", "role": "system", "content": [{"type": "input_text", "text": "Be terse."}]}}))
    assert (system.item.id, system.item.kind, system.respond) == ("sys_1", "system", False)  # added, not answered
    output = parse_client_event(json.dumps({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "c1", "output": "{}"}}))
    assert (output.item.kind, output.item.call_id, output.item.text) == ("function_call_output", "c1", "{}")
    create = parse_client_event('{"type": "response.create", "response": {"conversation": "none", "metadata": {"k": "v"}}}')
    assert create.order.out_of_band and create.order.metadata == {"k": "v"} and not create.order.text_only
    assert parse_client_event('{"type": "session.update", "session": {"commit_ms": 600}}').data == {
        "session": {"commit_ms": 600}
    }


def test_small_events_travel_whole():
    event = {"type": "response.text.delta", "delta": "hi"}
    messages = EventEncoder().encode(event)
    assert len(messages) == 1 and json.loads(messages[0]) == event


@pytest.mark.parametrize("text", ["a" * 5000, "é€😀\"\\\n" * 700, "x"])
def test_large_events_split_under_the_limit_and_join_back(text):
    event = {"type": "conversation.item.input_audio_transcription.completed", "transcript": text}
    messages = EventEncoder().encode(event)
    assert all(len(m.encode()) <= MAX_MESSAGE_BYTES for m in messages)
    joiner = ChunkJoiner()
    results = [joiner.feed(m) for m in messages]
    assert results[:-1] == [None] * (len(messages) - 1)
    assert results[-1] == event
