"""A user's tools module as `--tools tests.voice_tools` loads it: what the tool-call tests call."""

from __future__ import annotations

import asyncio
import time
from typing import Literal

CALLS: list[tuple[str, dict]] = []  # every call, in order, with its arguments
ARCHIVE: asyncio.Event | None = None  # the slow archive answers once a test sets it (one per test: events bind to a loop)


def order_status(order_id: str, detail: Literal["short", "full"] = "short") -> dict[str, str]:
    """The shipping status of an order.

    Args:
        order_id: the order's number, such as A17
        detail: how much to tell
    """
    CALLS.append(("order_status", {"order_id": order_id, "detail": detail}))
    time.sleep(1.2)  # a slow back end: longer than the filler's 700 ms
    return {"order_id": order_id, "status": "shipped", "arrives": "Friday"}


async def slow_lookup(query: str) -> str:
    """Look something up in a slow archive."""
    CALLS.append(("slow_lookup", {"query": query}))
    assert ARCHIVE is not None, "the test using this tool makes its ARCHIVE"
    await ARCHIVE.wait()
    return f"The archive says {query} was founded in 1850."


def broken_tool(x: int) -> str:
    """A tool whose back end is down."""
    CALLS.append(("broken_tool", {"x": x}))
    raise ConnectionError("back end unreachable")


async def stuck_tool() -> str:
    """A tool that never answers."""
    CALLS.append(("stuck_tool", {}))
    await asyncio.sleep(3600)
    return "never"
