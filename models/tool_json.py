"""Tool calls from an LM that writes them as JSON text (Step-Audio-Chat, whose call syntax was never
published): a reply that is one JSON object or list naming a function becomes calls; any other reply
streams as text, as soon as its first character shows it is not JSON."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, AsyncGenerator

from models.base import LanguageModel, Message, ToolCall


def parse_calls(text: str) -> list[ToolCall]:
    """The calls in `text` when all of it is JSON naming functions: `{"name", "arguments"}` (or
    `"parameters"`), the same under `"tool_call"` or `"function"`, or a list of them; else none."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls: list[ToolCall] = []
    for n, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("tool_call") or item.get("function") or item
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("arguments", item.get("parameters", {}))
        text_arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(f"call_{n}", item["name"], text_arguments))
    return calls


class JsonToolCalls:
    """Wraps an LM that sees tools in its prompt and answers a call as JSON text."""

    calls_tools = True

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str | ToolCall, None]:
        held = ""
        streaming = not tools
        async with aclosing(self.lm.stream(messages, max_new_tokens=max_new_tokens, tools=tools)) as deltas:
            async for delta in deltas:
                if streaming:
                    yield delta
                    continue
                held += str(delta)
                start = held.lstrip()
                if start and start[0] not in "{[":
                    streaming = True
                    yield held
        if streaming:
            return
        calls = parse_calls(held)
        if calls:
            for call in calls:
                yield call
        elif held:
            yield held

    async def aclose(self) -> None:
        await self.lm.aclose()
