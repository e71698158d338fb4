"""The bridge from a blocking producer in a worker thread to an async iterator on the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncGenerator, Callable, TypeVar

from runtime.workers import ModelWorker

T = TypeVar("T")

Post = Callable[[T], None]


async def thread_stream(worker: ModelWorker, produce: Callable[[Post[T], threading.Event], None]) -> AsyncGenerator[T, None]:
    """Run `produce(post, stop)` in `worker` and yield what it posts, in order.

    `produce` must check `stop` at each step: closing this iterator (a cancelled consumer) sets it,
    so the worker frees itself within one step. Its exception, if any, is raised here at the end.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[bool, T | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: tuple[bool, T | None]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens, stop producing
            stop.set()

    def run() -> None:
        try:
            if not stop.is_set():
                produce(lambda item: put((False, item)), stop)
        finally:
            put((True, None))

    done = asyncio.wrap_future(worker.submit(run))
    try:
        while True:
            finished, item = await queue.get()
            if finished:
                break
            yield item  # type: ignore[misc]
        await done  # the worker's error, if it had one
    finally:
        stop.set()
