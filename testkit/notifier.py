"""Awaiting a condition over state that grows, with a timeout: the tests' and peers' way to wait."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class Notifier:
    """Lets coroutines await a condition over growing state, with a timeout (no polling)."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := predicate()):
                await self._changed.wait()
            return result
