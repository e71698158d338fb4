"""One reply's function calls: announced, run after the commit, their outputs recorded whatever
happens to the reply, and the line never silent for long while they run."""

from __future__ import annotations

import asyncio
import json
from typing import AsyncGenerator

from context.dialog import Turn
from context.exchange import Exchange
from models.base import ToolCall
from realtime.events import ConversationItemCreated, FunctionCallArgumentsDone
from realtime.session import SessionIO
from runtime.tasks import TaskOwner
from tools.toolbox import Toolbox, ToolResult

FILLER = "One moment. "
APOLOGY = "Sorry, that didn't work. "


def spoken(result: ToolResult) -> str:
    """What to say of a result when no LM words it: its `spoken` sentence, or its output."""
    try:
        value = json.loads(result.output)
    except ValueError:
        return result.output
    return str(value.get("spoken", result.output)) if isinstance(value, dict) else result.output


class ToolUse:
    """Owns one reply's calls. Each call is announced (`response.function_call_arguments.done`)
    and its history entry made; the calls run in a task of the session's, so that a reply
    interrupted meanwhile (or swallowed by the user's continued turn) still gets their outputs into
    the history (announced as `conversation.item.created`) for the next turn. Nothing runs before
    the reply is committed: a speculative reply that is dropped calls nothing."""

    def __init__(
        self, toolbox: Toolbox, reply_id: str, io: SessionIO, exchange: Exchange, tasks: TaskOwner, committed: asyncio.Event
    ) -> None:
        self._toolbox = toolbox
        self._reply_id = reply_id
        self._io = io
        self._exchange = exchange
        self._tasks = tasks
        self._committed = committed
        self._count = 0
        self.results: list[ToolResult] = []  # of the latest run()

    async def run(self, calls: list[ToolCall]) -> AsyncGenerator[str, None]:
        """Run `calls`, yielding what the reply says meanwhile: a filler if they take longer than
        the toolbox's filler time, an apology if one failed. Their results are in `results` after."""
        await self._committed.wait()
        for call in calls:
            item_id = self._item_id("call")
            self._io.emit(FunctionCallArgumentsDone(self._reply_id, item_id, call.id, call.name, call.arguments))
            self._exchange.add_function_item(Turn("function_call", call.arguments, "completed", item_id, call_id=call.id, name=call.name))
        running = self._tasks.spawn(self._execute(calls), f"tools:{self._reply_id}")
        done, _ = await asyncio.wait({running}, timeout=self._toolbox.filler_s)
        if not done:
            yield FILLER
        self.results = await asyncio.shield(running)
        if not all(result.ok for result in self.results):
            yield APOLOGY

    async def _execute(self, calls: list[ToolCall]) -> list[ToolResult]:
        results = await asyncio.gather(*(self._toolbox.run(call) for call in calls))
        for result in results:
            item_id = self._item_id("output")
            call = result.call
            item = {"id": item_id, "type": "function_call_output", "call_id": call.id, "output": result.output}
            self._io.emit(ConversationItemCreated(item))
            status = "completed" if result.ok else "failed"
            self._exchange.add_function_item(Turn("function_call_output", result.output, status, item_id, call_id=call.id, name=call.name))
        return list(results)

    def _item_id(self, kind: str) -> str:
        self._count += 1
        return f"{self._reply_id}-{kind}{self._count}"
