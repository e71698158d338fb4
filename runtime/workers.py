"""Worker threads for model inference: the event loop never runs a model itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


WORKER_NICENESS = 10


def name_thread(name: str) -> None:
    """Give the calling thread `name` (up to 15 characters) where the system shows it: the
    threads it starts from now on inherit it, so a stage's CPU time can be read by name from
    /proc (its helper threads in the inference libraries included)."""
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name[:15])
    except OSError:  # not Linux
        pass


def start_worker_thread(name: str) -> None:
    name_thread(name)
    lower_priority()


def lower_priority() -> None:
    """Run the calling thread, and the threads it starts from now on, at WORKER_NICENESS."""
    # Linux schedules threads by their own nice value, and the inference libraries' helper threads
    # inherit it from the thread that starts them (models load and run here). With every core busy,
    # the event loop thread then still wakes on time to send the next 20 ms of audio.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class ModelWorker:
    """Owns a bounded pool of threads for one model; every call waits its turn there.

    Native inference code (CTranslate2, torch, onnxruntime) releases the GIL, so the event loop keeps
    pacing audio while a model runs. `busy` counts calls submitted and not yet finished, so that
    optional work (a partial transcript) can give way to work someone waits on.
    """

    _live: "weakref.WeakSet[ModelWorker]" = weakref.WeakSet()

    def __init__(self, name: str, threads: int = 1) -> None:
        ModelWorker._live.add(self)
        self.name = name
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=name, initializer=functools.partial(start_worker_thread, name)
        )
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False

    @classmethod
    def live(cls) -> list[ModelWorker]:
        """The workers of this process that are not closed (for metrics)."""
        return [worker for worker in list(cls._live) if not worker._closed]

    @property
    def busy(self) -> int:
        return self._busy

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            self._busy += 1
        future = self._pool.submit(functools.partial(fn, *args, **kwargs))
        future.add_done_callback(self._done)
        return future

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:  # runs in the worker thread
            self._busy -= 1

    def close(self) -> None:
        """Drop queued calls and wait for the running ones (each stops within one model step)."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
