"""The bridge from a blocking producer in a worker thread to an async iterator on the event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import AsyncGenerator, Callable, TypeVar

from runtime.workers import ModelWorker

T = TypeVar("T")

Post = Callable[[T], None]


async def thread_stream(worker: ModelWorker, produce: Callable[[Post[T], threading.Event], None]) -> AsyncGenerator[T, None]:
    """Run `produce(post, stop)` in `worker` and yield what it posts, in order.

    `produce` must check `stop` at each step: closing this iterator (a cancelled consumer) sets it,
    so the worker frees itself within one step. Its exception, if any, is raised here at the end.
    A producer that posts nothing for the worker's `stuck_after_s` raises StageStuck here.
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

    call = worker.start(run)
    try:
        since = 0.0
        while True:  # a producer silent for the worker's `stuck_after_s` is given up (StageStuck)
            finished, item = await worker.answer(queue.get, call, since)
            if finished:
                break
            since = time.monotonic()
            yield item  # type: ignore[misc]
        await asyncio.wrap_future(call.future)  # the worker's error, if it had one
    finally:
        stop.set()
