"""Worker threads for model inference: the event loop never runs a model itself."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import structlog

T = TypeVar("T")
log = structlog.get_logger()


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


class StageStuck(RuntimeError):
    """A model call ran longer than its worker's `stuck_after_s`: given up, its thread left to it."""


@dataclass
class Call:
    """One call queued in a ModelWorker."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    started: float | None = None  # monotonic, once a thread took it
    thread: threading.Thread | None = None
    ended: bool = False  # returned, or given up

    def running_s(self, since: float = 0.0) -> float:
        """How long it has run (0 while queued), counted from `since` if that is later."""
        return 0.0 if self.started is None else time.monotonic() - max(self.started, since)


class ModelWorker:
    """Owns a bounded set of threads for one model; every call waits its turn there.

    Native inference code (CTranslate2, torch, onnxruntime) releases the GIL, so the event loop keeps
    pacing audio while a model runs. `busy` counts calls submitted and not yet ended, so that
    optional work (a partial transcript) can give way to work someone waits on.

    With `stuck_after_s`, a call that has run that long without returning (a hung engine: a thread
    cannot be killed) fails its caller with StageStuck and is given up: a new thread takes its
    place, so the calls behind it go on; the stuck thread exits whenever its call returns.
    """

    _live: "weakref.WeakSet[ModelWorker]" = weakref.WeakSet()

    def __init__(self, name: str, threads: int = 1, stuck_after_s: float | None = None) -> None:
        ModelWorker._live.add(self)
        self.name = name
        self.threads = threads
        self.stuck_after_s = stuck_after_s
        self.given_up = 0  # calls given up on as stuck
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._closed = False
        self._started = 0
        self._threads = [self._start_thread() for _ in range(threads)]  # those not left to a stuck call

    @classmethod
    def live(cls) -> list[ModelWorker]:
        """The workers of this process that are not closed (for metrics)."""
        return [worker for worker in list(cls._live) if not worker._closed]

    @property
    def busy(self) -> int:
        return self._busy

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = self.start(fn, *args, **kwargs)
        future = asyncio.wrap_future(call.future)
        try:
            return await self.answer(lambda: asyncio.shield(future), call)
        except asyncio.CancelledError:
            future.cancel()  # nobody waits for it: dropped if still queued
            raise

    async def answer(self, receive: Callable[[], Awaitable[T]], call: Call, since: float = 0.0) -> T:
        """What `call` gives back (its result, or a streamed call's next item), by awaiting
        `receive()` (it must bear cancelling: it is called again after each timeout); given up as
        stuck after `stuck_after_s` of running since the call started or since `since`."""
        while True:  # the time counts from when a thread takes the call, not while it is queued
            limit = None if self.stuck_after_s is None or call.ended else max(0.0, self.stuck_after_s - call.running_s(since))
            try:
                async with asyncio.timeout(limit) as timer:
                    return await receive()  # what is already there is taken, however late it is asked for
            except TimeoutError:
                if not timer.expired():
                    raise  # the call's own error
            assert self.stuck_after_s is not None
            if call.running_s(since) >= self.stuck_after_s and self._give_up(call):
                raise StageStuck(f"{self.name}: a call gave no answer in {self.stuck_after_s:g} s")

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self.start(fn, *args, **kwargs).future

    def start(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
        """Queue `fn(*args, **kwargs)` (blocking work) for a thread; `Call.future` holds what it
        returns."""
        if self._closed:
            raise RuntimeError(f"worker {self.name} is closed")
        call = Call(functools.partial(fn, *args, **kwargs))
        with self._lock:
            self._busy += 1
        self._queue.put(call)
        return call

    def _give_up(self, call: Call) -> bool:
        """Whether `call` was still running: then it no longer counts, and a new thread serves."""
        with self._lock:
            if call.ended:
                return False
            call.ended = True
            self._busy -= 1
            self.given_up += 1
            self._threads.remove(call.thread)  # type: ignore[arg-type]
            self._threads.append(self._start_thread())
        log.error("worker.call_stuck", worker=self.name, seconds=round(call.running_s(), 1))
        return True

    def _start_thread(self) -> threading.Thread:
        self._started += 1
        thread = threading.Thread(target=self._serve, name=f"{self.name}_{self._started - 1}", daemon=True)
        thread.start()
        return thread

    def _serve(self) -> None:
        start_worker_thread(self.name)
        while (call := self._queue.get()) is not None:
            if not call.future.set_running_or_notify_cancel():  # its caller went away while it was queued
                with self._lock:
                    self._busy -= 1
                continue
            call.thread, call.started = threading.current_thread(), time.monotonic()
            try:
                result, error = call.fn(), None
            except BaseException as exc:
                result, error = None, exc
            with self._lock:
                given_up, call.ended = call.ended, True
                self._busy -= not given_up
            if error is None:
                call.future.set_result(result)
            else:
                call.future.set_exception(error)
            if given_up:  # its caller has gone, and another thread serves in its place
                return

    def close(self) -> None:
        """Drop queued calls and wait for the running ones (each stops within one model step; a
        stuck one is not waited for)."""
        self._closed = True
        while True:
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                break
            if call is not None and call.future.cancel():
                with self._lock:
                    self._busy -= 1
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
