"""Many workers, one registry: servers announce themselves and their sessions in a real Redis
(`redis-server`, the Debian package), lapse when they die, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from redis import asyncio as redis

from config import WorkerConfig
from context.dialog import TranscriptStore
from realtime.shared_transcripts import transcript_key
from realtime.worker_registry import WORKERS, live_workers, session_key, session_worker, worker_key
from testkit.local import free_port
from testkit.peer import OfferRefused
from testkit.ws_peer import WsPeer
from tests.test_openai_realtime import Scripted
from tests.test_tracing import _call

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


async def until(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """The first truthy result of `check`, asked every 50 ms: Redis tells no one when a key lapses."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    assert result, what
    return result


@pytest.fixture
async def redis_url(tmp_path) -> AsyncIterator[str]:
    """A real redis-server of its own, on a unix socket, keeping nothing on disk."""
    if shutil.which("redis-server") is None:  # `make test` installs it: missing is a broken setup
        pytest.fail("the registry tests need redis-server (apt-get install redis-server)")
    socket = tmp_path / "redis.sock"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(socket), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{socket}"
    client = redis.from_url(url)
    try:
        await until(lambda: asyncio.to_thread(socket.exists), 10, "redis-server never opened its socket")
        await until(client.ping, 10, "redis-server never answered")
        yield url
    finally:
        await client.aclose()
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
async def client(redis_url) -> AsyncIterator[Any]:
    c = redis.from_url(redis_url, decode_responses=True)
    yield c
    await c.aclose()


async def test_workers_announce_themselves_and_the_sessions_they_hold(start_server, redis_url, client):
    a = await start_server(worker=WorkerConfig(registry=redis_url, advertise_url="http://a.example:8080", heartbeat_s=0.5))
    b = await start_server(worker=WorkerConfig(registry=redis_url, advertise_url="http://b.example:8080", heartbeat_s=0.5))
    workers = await until(lambda: _two(client), 10, "both workers registered")
    assert {w.url for w in workers} == {"http://a.example:8080", "http://b.example:8080"}
    assert all(w.profile == "loopback" and w.admitting and not w.draining and w.sessions == 0 for w in workers)
    by_url = {w.url: w.id for w in workers}

    peer = WsPeer(b.url)
    session_id = await peer.connect()
    # Written as the call opens, not at the next heartbeat.
    assert await until(lambda: session_worker(client, session_id), 0.4, "the session recorded") == by_url["http://b.example:8080"]
    record = {w.url: w for w in await live_workers(client)}["http://b.example:8080"]
    assert record.sessions == 1
    await peer.close()
    await until(lambda: _gone(client, session_key(session_id)), 5, "the session's record removed when it closed")
    assert a.registry.health()["sessions"] == 0


async def test_a_transcript_written_on_one_worker_is_read_through_another(start_server, redis_url, client, tmp_path):
    """Each record a worker writes goes to its own JSONL and, in order, to Redis: the transcript is
    answered through any worker, the same as its own worker answers it."""
    agents = Scripted(TranscriptStore(tmp_path / "a"))
    a = await start_server(factory=agents, transcripts=agents.store, echo_cancel="off", worker=WorkerConfig(registry=redis_url))
    b = await start_server(data_dir=tmp_path / "b", worker=WorkerConfig(registry=redis_url))
    session_id, _ = await _call(a, agents, ("What is the capital of France?", "And of Spain?"))

    async def read(server: Any) -> Any:
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/api/sessions/{session_id}/transcript") as response:
            return response.status, await response.json()

    own = await read(a)
    assert own[0] == 200 and [t["role"] for t in own[1]["turns"]] == ["user", "assistant", "user", "assistant"]
    assert await client.llen(transcript_key(session_id)) >= 4
    assert await read(b) == own
    assert not (tmp_path / "b" / "sessions").exists()  # b has no copy of its own: it read the shared one


async def _two(client: Any) -> Any:
    workers = await live_workers(client)
    return workers if len(workers) == 2 else None


async def _gone(client: Any, key: str) -> bool:
    return not await client.exists(key)


def registered(redis_url: str) -> tuple[str, ...]:
    return ("--registry", redis_url, "--heartbeat-s", "0.2")


@contextlib.asynccontextmanager
async def running_worker(
    tmp_path: Path, *flags: str, port: int | None = None, ready_s: float = 60
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """run_server.py on the loopback profile (unless `flags` name another) with `flags`, and its URL
    once it answers; killed at the end if it has not exited."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "run_server.py", "--profile", "loopback", "--port", str(port), "--loopback-ice",
        "--data-dir", str(tmp_path / f"data-{port}"), *flags,
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )

    async def answers() -> bool:
        assert process.returncode is None, "the worker exited at start-up"
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    try:
        await until(answers, ready_s, "the worker answered /healthz")
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_worker_that_dies_lapses_from_the_registry(redis_url, client, tmp_path):
    async with running_worker(tmp_path, *registered(redis_url)) as (process, url):
        [worker] = await until(lambda: live_workers(client), 10, "the worker registered")
        assert worker.url == url
        peer = WsPeer(url)
        session_id = await peer.connect()
        await until(lambda: session_worker(client, session_id), 2, "its session recorded")
        process.send_signal(signal.SIGKILL)  # no goodbye: only the records' expiry removes it
        await process.wait()
        await peer.close()
        # Three missed heartbeats of 0.2 s: gone well within a second, its session with it.
        await until(lambda: _gone(client, worker_key(worker.id)), 1.5, "the dead worker's record lapsed")
        await until(lambda: _gone(client, session_key(session_id)), 1.5, "its session's record lapsed")
        assert await live_workers(client) == []
        assert await client.zcard(WORKERS) == 0  # the reader dropped it from the set


async def test_sigterm_drains_a_worker_its_call_finishes_then_it_leaves(redis_url, client, tmp_path):
    async with running_worker(tmp_path, *registered(redis_url), "--drain-timeout-s", "60") as (process, url):
        [worker] = await until(lambda: live_workers(client), 10, "the worker registered")
        peer = WsPeer(url)
        session_id = await peer.connect()
        process.send_signal(signal.SIGTERM)

        async def draining() -> Any:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
                return response.status == 503 and (await response.json())
        health = await until(draining, 5, "/healthz says draining")
        assert health["status"] == "draining" and health["sessions"] == 1 and not health["admitting"]
        # Out of the set new calls are picked from; its record and its session's still there.
        await until(lambda: _gone_from_set(client, worker.id), 2, "the worker left the set of workers")
        assert await session_worker(client, session_id) == worker.id
        refused_peer = WsPeer(url)
        with pytest.raises(OfferRefused) as refused:
            await refused_peer.connect()
        await refused_peer.close()
        assert refused.value.status == 503
        # The call up goes on: the loopback agent still answers it.
        peer.speak(_tone(), 16000)
        await peer.changed.wait_for(lambda: len(peer.received) > 50, 10)
        assert process.returncode is None
        await peer.close()  # the last call ends: the worker exits, and leaves no record behind
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert not await client.exists(worker_key(worker.id), session_key(session_id))


async def test_a_drain_that_times_out_closes_the_calls_left(redis_url, client, tmp_path):
    async with running_worker(tmp_path, *registered(redis_url), "--drain-timeout-s", "0.5") as (process, url):
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws") as ws:
            await ws.send_str(json.dumps({"type": "session.start", "input_sample_rate": 16000}))
            assert (await ws.receive_json(timeout=5))["type"] == "session.created"
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "session.closed":
                        assert json.loads(message.data)["reason"] == "server_shutdown"
                        break
                else:
                    raise AssertionError("the WebSocket closed without session.closed")
        assert await asyncio.wait_for(process.wait(), 15) == 0
        assert await live_workers(client) == []


async def _gone_from_set(client: Any, worker_id: str) -> bool:
    return await client.zscore(WORKERS, worker_id) is None


def _tone() -> Any:
    import numpy as np

    t = np.arange(16000 * 2) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_registry_url_is_checked_and_its_password_never_logged():
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match="--registry"):
        load_config(["--registry", "localhost:6379"])
    config = load_config(["--registry", "redis://worker:s3cret@redis:6379/0", "--drain-timeout-s", "20"])
    assert config.worker.registry == "redis://worker:s3cret@redis:6379/0" and config.worker.drain_timeout_s == 20
    assert "s3cret" not in json.dumps(config.describe())
