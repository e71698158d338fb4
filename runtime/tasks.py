"""Task ownership: every asyncio task the server starts belongs to a TaskOwner that cancels and
awaits it."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

import structlog

T = TypeVar("T")

log = structlog.get_logger()


def log_failure(task: asyncio.Task[Any], exc: BaseException) -> None:
    log.error("task.failed", task=task.get_name(), error=repr(exc))


class TaskOwner:
    """Owns a set of tasks: starts them named under `prefix`, reports each failure to `on_failure`
    (cancellations are not failures; by default it is logged), and cancels and awaits whatever is left at aclose()."""

    def __init__(self, prefix: str, on_failure: Callable[[asyncio.Task[Any], BaseException], None] = log_failure) -> None:
        self.prefix = prefix
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: set[asyncio.Task[Any]] = set()  # cancelled on request, still to be awaited

    @property
    def tasks(self) -> frozenset[asyncio.Task[Any]]:
        return frozenset(self._tasks | self._retired)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.prefix}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def cancel(self, task: asyncio.Task[Any] | None) -> None:
        """Cancel one task now; aclose() still awaits it."""
        if task is None:
            return
        task.cancel()
        if task in self._tasks:
            self._retired.add(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._retired.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._on_failure(task, exc)

    async def aclose(self, keep: asyncio.Task[Any] | None = None) -> None:
        """Cancel every task (but `keep`, the caller's own) and wait until all have ended."""
        tasks = [t for t in self._tasks | self._retired if t is not keep]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
