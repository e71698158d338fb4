"""Unit: model workers: calls wait their turn, a stuck call is given up and the others go on."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from runtime.bridge import thread_stream
from runtime.workers import ModelWorker, StageStuck

pytestmark = pytest.mark.unit


def _serving(worker: ModelWorker) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{worker.name}_")]


async def test_a_stuck_call_fails_its_caller_and_the_calls_behind_it_go_on():
    worker = ModelWorker("stuck-probe", stuck_after_s=0.3)
    release = threading.Event()
    try:
        started = time.monotonic()
        stuck = asyncio.ensure_future(worker.run(release.wait))
        behind = asyncio.ensure_future(worker.run(lambda: "answered"))  # queued behind the stuck call
        with pytest.raises(StageStuck, match="no answer in 0.3 s"):
            await asyncio.wait_for(stuck, 5.0)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert await asyncio.wait_for(behind, 2.0) == "answered"
        assert await asyncio.wait_for(worker.run(lambda: 7), 2.0) == 7  # a new thread serves
        assert worker.given_up == 1 and worker.busy == 0
        assert len(_serving(worker)) == 2  # the stuck thread and its replacement
        release.set()
        for thread in _serving(worker):
            if thread.name == "stuck-probe_0":
                thread.join(2.0)
        assert [t.name for t in _serving(worker)] == ["stuck-probe_1"]  # it left once its call returned
    finally:
        release.set()
        worker.close()


async def test_time_spent_queued_does_not_count_as_stuck():
    worker = ModelWorker("queued-probe", stuck_after_s=0.5)
    try:
        first = asyncio.ensure_future(worker.run(time.sleep, 0.4))  # stands for a model's work
        second = await worker.run(lambda: time.sleep(0.3) or "second")  # waits 0.4 s, runs 0.3 s
        await first
        assert second == "second" and worker.given_up == 0
    finally:
        worker.close()


async def test_a_calls_own_timeout_error_is_its_caller_s():
    worker = ModelWorker("error-probe", stuck_after_s=5.0)

    def fails() -> None:
        raise TimeoutError("the engine's own")

    try:
        with pytest.raises(TimeoutError, match="the engine's own"):
            await asyncio.wait_for(worker.run(fails), 2.0)
        assert worker.busy == 0 and worker.given_up == 0
    finally:
        worker.close()


async def test_a_stream_that_goes_silent_is_given_up():
    worker = ModelWorker("stream-probe", stuck_after_s=0.3)
    release = threading.Event()

    def produce(post, stop: threading.Event) -> None:
        post("first")
        time.sleep(0.2)  # slower than the limit in all, each step within it
        post("second")
        release.wait()

    received: list[str] = []
    try:
        with pytest.raises(StageStuck):
            async for item in thread_stream(worker, produce):
                received.append(item)
        assert received == ["first", "second"]
    finally:
        release.set()
        worker.close()


async def test_a_stream_read_slowly_is_not_stuck():
    """Items that wait for a consumer busy elsewhere (longer than the limit) are its to take."""
    worker = ModelWorker("slow-reader", stuck_after_s=0.2)
    read_all = threading.Event()

    def produce(post, stop: threading.Event) -> None:
        for word in ("one", "two", "three"):
            post(word)
        read_all.wait()  # still running while its items wait to be read

    got: list[str] = []
    try:
        async for item in thread_stream(worker, produce):
            got.append(item)
            if len(got) == 3:
                read_all.set()
            await asyncio.sleep(0.3)  # stands for the consumer's own work (speaking the piece)
        assert got == ["one", "two", "three"] and worker.given_up == 0
    finally:
        read_all.set()
        worker.close()


async def test_a_call_dropped_while_queued_is_not_counted():
    worker = ModelWorker("drop-probe")
    release = threading.Event()
    try:
        running = worker.start(release.wait)
        queued = worker.start(lambda: None)
        assert worker.busy == 2
        assert queued.future.cancel()  # its caller went away before a thread took it
        ran: list[str] = []
        waiter = asyncio.ensure_future(worker.run(ran.append, "the caller was cancelled"))
        for _ in range(100):  # the task's first step queues its call behind the running one
            if worker.busy == 3:  # the running call, the dropped one (counted until a thread skips it), this one
                break
            await asyncio.sleep(0)
        assert worker.busy == 3
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await asyncio.wrap_future(running.future)
        await asyncio.wait_for(worker.run(ran.append, "later"), 2.0)
        assert worker.busy == 0 and ran == ["later"]  # the cancelled caller's call never ran
    finally:
        release.set()
        worker.close()
