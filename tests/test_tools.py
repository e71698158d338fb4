"""Tools: schemas from functions, running calls (timeouts, failures), the built-in tools, the rule
for LMs that cannot call, the OpenAI backend's streamed tool calls, JSON calls from Step-Audio-Chat,
and function calls in the history."""

from __future__ import annotations

import asyncio
import datetime
import json
from contextlib import aclosing

import pytest
from aiohttp import web

from context.dialog import DialogContext, Turn
from context.exchange import Exchange
from models.base import Message, ToolCall, plain_messages
from models.openai_lm import OpenAICompatibleLM
from models.stepaudio_chat import chat_prompt
from models.tool_json import JsonToolCalls, parse_calls
from tests import voice_tools
from tests.fakes import serve
from tools.builtin import calculate, convert_units, current_time
from tools.rules import route
from tools.toolbox import Toolbox, ToolSetupError, load_toolbox, module_tools, tool_from_function

pytestmark = pytest.mark.unit


def test_a_functions_hints_and_docstring_become_its_schema():
    tool = tool_from_function(voice_tools.order_status, timeout_s=5)
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "order_status",
            "description": "The shipping status of an order.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "the order's number, such as A17"},
                    "detail": {"type": "string", "enum": ["short", "full"], "description": "how much to tell"},
                },
                "required": ["order_id"],
            },
        },
    }
    assert [t.name for t in module_tools("tests.voice_tools", 5)] == ["order_status", "slow_lookup", "broken_tool", "stuck_tool"]


def test_functions_that_cannot_be_described_are_refused_with_the_reason():
    def no_doc(x: int) -> int:
        return x

    def no_hint(x):  # type: ignore[no-untyped-def]
        """Doc."""

    def star(*xs: int) -> int:
        """Doc."""
        return 0

    for function, reason in ((no_doc, "docstring"), (no_hint, "type hint"), (star, r"\*args")):
        with pytest.raises(ToolSetupError, match=reason):
            tool_from_function(function, 5)
    with pytest.raises(ToolSetupError, match="cannot import"):
        module_tools("no_such_module_here", 5)
    with pytest.raises(ToolSetupError, match="two tools"):
        Toolbox([tool_from_function(current_time, 5), tool_from_function(current_time, 5)])


async def test_a_call_runs_to_its_result_its_timeout_or_its_failure_and_never_raises():
    box = Toolbox([tool_from_function(f, 0.5) for f in (voice_tools.broken_tool, voice_tools.stuck_tool, calculate)])
    ok = await box.run(ToolCall("1", "calculate", '{"expression": "17 * 23"}'))
    assert ok.ok and json.loads(ok.output)["result"] == "391"
    failed = await box.run(ToolCall("2", "broken_tool", '{"x": 1}'))
    assert not failed.ok and "back end unreachable" in json.loads(failed.output)["error"]
    stuck = await asyncio.wait_for(box.run(ToolCall("3", "stuck_tool", "{}")), 5)
    assert not stuck.ok and "longer than 0.5 s" in stuck.output and 450 < stuck.ms < 2000
    for arguments, reason in (("{not json", "bad arguments"), ('{"y": 2}', "bad arguments"), ("[1]", "not a JSON object")):
        result = await box.run(ToolCall("4", "calculate", arguments))
        assert not result.ok and reason in result.output
    missing = await box.run(ToolCall("5", "launch_rockets", "{}"))
    assert not missing.ok and "no function named" in missing.output

    async def patient() -> str:
        """Waits a while."""
        await asyncio.sleep(0.8)
        return "done"

    patient.timeout_s = 2.0  # type: ignore[attr-defined]  # a function's own timeout wins
    assert (await Toolbox([tool_from_function(patient, 0.5)]).run(ToolCall("6", "patient", "{}"))).ok


def test_the_builtin_tools():
    now = datetime.datetime.now().astimezone()
    told = datetime.datetime.fromisoformat(current_time()["iso"])
    assert abs((told - now).total_seconds()) < 60 and told.tzinfo is not None
    assert calculate("17 * 23")["result"] == "391" and calculate("17 * 23")["spoken"] == "17 times 23 is 391."
    assert calculate("15 % of 80")["result"] == "12" and calculate("2 ** 10")["result"] == "1024"
    assert calculate("sqrt(2)")["result"] == "1.41421"
    for hostile in ("__import__('os').system('true')", "open('/etc/passwd')", "9 ** 9 ** 9", "x * 2"):
        with pytest.raises((ValueError, SyntaxError)):
            calculate(hostile)
    assert convert_units(5, "miles", "km")["result"] == "8.0467"
    assert convert_units(98.6, "degrees fahrenheit", "celsius")["result"] == "37"
    with pytest.raises(ValueError, match="cannot convert"):
        convert_units(1, "kg", "km")
    assert load_toolbox(None, False, 5, 700) is None
    assert set(load_toolbox("tests.voice_tools", True, 5, 700).tools) >= {"current_time", "calculate", "convert_units", "order_status"}


@pytest.mark.parametrize(
    ("said", "name", "arguments"),
    [
        ("What time is it?", "current_time", {}),
        ("Can you tell me the time?", "current_time", {}),
        ("what day is it today", "current_time", {}),
        ("What is 17 times 23?", "calculate", {"expression": "17 * 23"}),
        ("What's fifteen percent of eighty?", "calculate", {"expression": "15 % of 80"}),
        ("What is two hundred and five divided by five?", "calculate", {"expression": "205 / 5"}),
        ("How many kilometers are in 5 miles?", "convert_units", {"value": 5.0, "from_unit": "miles", "to_unit": "kilometers"}),
        ("What is the capital of France?", None, None),
        ("What is love?", None, None),
        ("What is the time in Tokyo?", None, None),
        ("Tell me about the times of Shakespeare.", None, None),
    ],
)
def test_the_rule_routes_only_the_questions_it_knows(said, name, arguments):
    call = route(said)
    assert (call.name, json.loads(call.arguments)) == (name, arguments) if name else call is None


class ToolCallingServer:
    """An OpenAI-compatible chat endpoint that streams what `script(request)` gives: text and tool
    calls as chat-completion deltas. By default the first request gets text and two calls, their
    arguments cut across chunks and interleaved, and later ones (with the outputs) `reply`."""

    def __init__(self, script=None, reply: str = "Done.") -> None:
        self.requests: list[dict] = []
        self.reply = reply
        self.script = script or self.two_calls
        self.received = asyncio.Condition()

    def two_calls(self, body: dict) -> list[dict]:
        if any(m["role"] == "tool" for m in body["messages"]):
            return [{"content": self.reply}]
        return [
            {"role": "assistant", "content": "Let me check. "},
            {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "order_status", "arguments": ""}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '{"order'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '_id": "A1'}}]},
            {"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "calculate", "arguments": '{"expr'}}]},
            {"tool_calls": [{"index": 0, "function": {"arguments": '7"}'}}]},
            {"tool_calls": [{"index": 1, "function": {"arguments": 'ession": "2 + 2"}'}}]},
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with self.received:
            self.requests.append(body)
            self.received.notify_all()
        deltas = self.script(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in deltas:
            chunk = {"choices": [{"index": 0, "delta": delta}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        finish = "tool_calls" if any("tool_calls" in d for d in deltas) else "stop"
        await response.write(f'data: {json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})}\n\ndata: [DONE]\n\n'.encode())
        return response

    async def wait_requests(self, count: int, timeout: float) -> dict:
        async with self.received:
            await asyncio.wait_for(self.received.wait_for(lambda: len(self.requests) >= count), timeout)
        return self.requests[count - 1]


@pytest.fixture
async def tool_server():
    server = ToolCallingServer()
    runner = await serve(server)
    yield server
    await runner.cleanup()


async def test_the_openai_backend_sends_tools_and_joins_streamed_calls(tool_server):
    lm = OpenAICompatibleLM(tool_server.url, "m", None, 32, 0.0)
    schemas = load_toolbox("tests.voice_tools", True, 5, 700).schemas()
    try:
        async with aclosing(lm.stream([Message("user", "Where is my order A17?")], tools=schemas)) as stream:
            items = [item async for item in stream]
        history = [
            Message("user", "Where is my order A17?"),
            Message("assistant", "Let me check. ", tuple(i for i in items if isinstance(i, ToolCall))),
            Message("tool", '{"status": "shipped"}', tool_call_id="call_a"),
            Message("tool", '{"result": "4"}', tool_call_id="call_b"),
        ]
        async with aclosing(lm.stream(history, tools=schemas)) as stream:
            answer = [item async for item in stream]
    finally:
        await lm.aclose()
    assert lm.calls_tools
    assert items == ["Let me check. ", ToolCall("call_a", "order_status", '{"order_id": "A17"}'), ToolCall("call_b", "calculate", '{"expression": "2 + 2"}')]
    assert answer == ["Done."]
    assert tool_server.requests[0]["tools"] == schemas
    assert tool_server.requests[1]["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me check. ",
            "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "order_status", "arguments": '{"order_id": "A17"}'}},
                {"id": "call_b", "type": "function", "function": {"name": "calculate", "arguments": '{"expression": "2 + 2"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"status": "shipped"}'},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"result": "4"}'},
    ]


class RefusesTools:
    """A chat endpoint started without tool support: HTTP 400 to any request that offers tools."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if "tools" in body:
            return web.json_response({"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice'}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f'data: {json.dumps({"choices": [{"index": 0, "delta": {"content": "Fine."}}]})}\n\ndata: [DONE]\n\n'.encode())
        return response


async def test_an_endpoint_that_refuses_tools_is_asked_again_without_and_the_rule_takes_over():
    endpoint = RefusesTools()
    runner = await serve(endpoint)
    lm = OpenAICompatibleLM(endpoint.url, "m", None, 32, 0.0)
    schemas = load_toolbox(None, True, 5, 700).schemas()
    earlier = [Message("assistant", "", (ToolCall("c", "current_time", "{}"),)), Message("tool", '{"time": "02:00"}', tool_call_id="c")]
    try:
        async with aclosing(lm.stream([Message("user", "Hi"), *earlier], tools=schemas)) as stream:
            first = [item async for item in stream]
        async with aclosing(lm.stream([Message("user", "Hi")], tools=schemas)) as stream:
            second = [item async for item in stream]
    finally:
        await lm.aclose()
        await runner.cleanup()
    assert first == second == ["Fine."] and not lm.calls_tools
    assert ["tools" in r for r in endpoint.requests] == [True, False, False]
    assert [m["role"] for m in endpoint.requests[1]["messages"]] == ["user", "assistant", "user"]  # calls as text


class Scripted:
    """An LM that says given text, in pieces."""

    calls_tools = False

    def __init__(self, text: str) -> None:
        self.text = text
        self.seen: list = []

    async def stream(self, messages, max_new_tokens=None, tools=None):
        self.seen.append(tools)
        for i in range(0, len(self.text), 3):
            yield self.text[i : i + 3]


async def test_step_audio_chat_sees_the_schemas_and_its_json_becomes_calls():
    schemas = load_toolbox(None, True, 5, 700).schemas()
    prompt = chat_prompt([Message("system", "S"), Message("user", "<audio_1>")], schemas)
    assert prompt.startswith(f"<|BOT|>system\nS<|EOT|><|BOT|>tool_json_schemas\n{json.dumps(schemas, ensure_ascii=False)}<|EOT|>")
    later = chat_prompt([Message("user", "q"), Message("assistant", "", (ToolCall("c", "current_time", "{}"),)), Message("tool", '{"time": "02:00"}', tool_call_id="c")])
    assert '<|BOT|>assistant\n{"name": "current_time", "arguments": {}}<|EOT|><|BOT|>tool\n{"time": "02:00"}<|EOT|>' in later
    for text, expected in (
        ('{"name": "current_time", "arguments": {}}', [ToolCall("call_0", "current_time", "{}")]),
        (' [{"name": "calculate", "parameters": {"expression": "1+1"}}]', [ToolCall("call_0", "calculate", '{"expression": "1+1"}')]),
        ('{"tool_call": {"name": "current_time"}}', [ToolCall("call_0", "current_time", "{}")]),
    ):
        assert parse_calls(text) == expected
        async with aclosing(JsonToolCalls(Scripted(text)).stream([], tools=schemas)) as stream:
            assert [i async for i in stream] == expected
    for text in ('{"weather": "fine"}', "[1, 2]", "{broken"):
        assert parse_calls(text) == []
        async with aclosing(JsonToolCalls(Scripted(text)).stream([], tools=schemas)) as stream:
            assert "".join([i async for i in stream]) == text
    plain = Scripted("It is sunny today.")  # streams as it comes once it is clearly not JSON
    async with aclosing(JsonToolCalls(plain).stream([], tools=schemas)) as stream:
        assert [i async for i in stream][:2] == ["It ", "is "]


def test_function_calls_in_the_history_become_call_and_output_messages_in_order():
    context = DialogContext("sys", 1000)
    swallowed = Exchange(context, "u0")  # a reply the user's continued turn swallowed: no user turn of its own
    swallowed.add_function_item(Turn("function_call", '{"order_id": "A17"}', "completed", "r0-call1", call_id="c1", name="order_status"))
    exchange = Exchange(context, "u1")
    exchange.add_reply(Turn("assistant", "One moment.", "interrupted", "r1"))
    assert context.turns == []  # the user's turn comes first: held until it is in
    exchange.add_user("Where is my order?")
    assert [t.role for t in context.turns] == ["user", "function_call", "assistant"]
    # The output lands after the interrupted reply; the LM still sees it right after its call.
    swallowed.add_function_item(Turn("function_call_output", '{"status": "shipped"}', "completed", "r0-output2", call_id="c1", name="order_status"))
    assert context.turns[-1].role == "assistant"  # not yet: its exchange has no user turn, so it waits
    exchange.add_function_item(Turn("function_call", "{}", "completed", "r1-call1", call_id="c9", name="current_time"))
    assert context.turns[-1].call_id == "c9"  # this one's exchange has its user turn: in at once
    context.add(Turn("user", "Hm?"))
    assert [t.role for t in context.turns][-2:] == ["user", "function_call_output"]
    assert context.messages("And when?") == [
        Message("system", "sys"),
        Message("user", "Where is my order?"),
        Message("assistant", "", (ToolCall("c1", "order_status", '{"order_id": "A17"}'),)),
        Message("tool", '{"status": "shipped"}', tool_call_id="c1"),
        Message("assistant", "One moment."),
        Message("user", "Hm?"),
        Message("user", "And when?"),
    ]
    pending = DialogContext("sys", 1000)
    pending.add(Turn("user", "q"))
    pending.add(Turn("function_call", "{}", call_id="c2", name="slow_lookup"))
    assert [m.role for m in pending.messages()] == ["system", "user"]  # no output yet: not shown
    assert plain_messages(context.messages())[2:4] == [
        Message("assistant", '(calling order_status({"order_id": "A17"}))'),
        Message("user", '(result of a function: {"status": "shipped"})'),
    ]
