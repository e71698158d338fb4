"""One address in front of many workers: the real HAProxy (the Debian package) with
`deploy/haproxy.cfg`, in front of two real workers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from realtime.webrtc import use_loopback_ice_only
from testkit.local import free_port
from testkit.peer import ClientPeer, OfferRefused
from testkit.ws_peer import WsPeer
from tests.test_worker import running_worker, until

pytestmark = pytest.mark.unit

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
WORKER_FLAGS = ("--max-sessions", "1", "--record", "--drain-timeout-s", "60")


@pytest.fixture(autouse=True)
def loopback_client() -> None:
    use_loopback_ice_only()  # the workers here offer 127.0.0.1 only; so must this client


@contextlib.asynccontextmanager
async def haproxy(*workers: str) -> AsyncIterator[str]:
    """HAProxy with the project's configuration in front of `workers` (URLs); its URL once every
    worker is seen up by its health checks."""
    if shutil.which("haproxy") is None:  # `make test` installs it: missing is a broken setup
        pytest.fail("the proxy tests need haproxy (apt-get install haproxy)")
    port = free_port()
    env = os.environ | {"VOICE_PROXY_BIND": f"127.0.0.1:{port}"}
    env |= {f"VOICE_WORKER_{n}": url.removeprefix("http://") for n, url in enumerate(workers, 1)}
    process = await asyncio.create_subprocess_exec(
        "haproxy", "-db", "-f", str(CONFIG), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await until(lambda: _all_up(url, len(workers)), 20, "HAProxy saw every worker up")
        yield url
    finally:
        process.terminate()
        await process.wait()


async def _all_up(url: str, workers: int) -> bool:
    """Whether `workers` requests in a row reach a worker (each goes to one that is up)."""
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(workers * 2):
                async with http.get(f"{url}/healthz") as response:
                    if response.status != 200:
                        return False
        return True
    except aiohttp.ClientError:
        return False


async def _sessions(url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return int((await response.json())["sessions"])


async def _recording_status(url: str, session_id: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/sessions/{session_id}/recording") as response:
        return response.status


async def test_calls_through_the_proxy_fill_both_workers_then_are_refused(tmp_path):
    async with (
        running_worker(tmp_path, *WORKER_FLAGS) as (_, a),
        running_worker(tmp_path, *WORKER_FLAGS) as (_, b),
        haproxy(a, b) as front,
    ):
        first, second = WsPeer(front), WsPeer(front)
        await first.connect()
        await second.connect()  # whichever worker took the first is full: the second goes to the other
        assert (await _sessions(a), await _sessions(b)) == (1, 1)
        third = WsPeer(front)
        with pytest.raises(OfferRefused) as refused:  # every worker full: only then the caller hears 503
            await third.connect()
        await third.close()
        assert refused.value.status == 503
        await second.close()
        await until(lambda: _one_free(a, b), 5, "a worker freed")

        # A WebRTC call through the proxy: its session's requests reach the worker that holds it
        # (its recording, while the call is up, is 409 there and 404 on the other worker).
        call = ClientPeer(front)
        session_id = await call.connect()
        assert sorted([await _recording_status(a, session_id), await _recording_status(b, session_id)]) == [404, 409]
        assert [await _recording_status(front, session_id) for _ in range(6)] == [409] * 6
        await call.close()
        await first.close()


async def _one_free(a: str, b: str) -> bool:
    return await _sessions(a) + await _sessions(b) == 1


async def test_a_draining_worker_takes_no_new_call_through_the_proxy(tmp_path):
    async with (
        running_worker(tmp_path, *WORKER_FLAGS[2:]) as (draining, a),
        running_worker(tmp_path, *WORKER_FLAGS[2:]) as (_, b),
        haproxy(a, b) as front,
    ):
        kept = WsPeer(a)
        await kept.connect()
        draining.send_signal(signal.SIGTERM)
        await until(lambda: _draining(a), 5, "the worker drains")
        peers = [WsPeer(front) for _ in range(4)]
        for peer in peers:  # no waiting for the health check: a 503 from the draining one is retried elsewhere
            await peer.connect()
        assert (await _sessions(b), await _sessions(a)) == (4, 1)
        for peer in peers:
            await peer.close()
        await kept.close()
        assert await asyncio.wait_for(draining.wait(), 15) == 0


async def _draining(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
        return response.status == 503


async def test_a_worker_killed_leaves_the_calls_to_the_other(tmp_path):
    """SIGKILL: no drain, no goodbye. New calls through the proxy land on the worker left, at once
    (a refused connection is retried elsewhere) and after the health check has noticed."""
    async with (
        running_worker(tmp_path) as (killed, a),
        running_worker(tmp_path) as (_, b),
        haproxy(a, b) as front,
    ):
        killed.send_signal(signal.SIGKILL)
        await killed.wait()
        peers = [WsPeer(front) for _ in range(4)]
        for peer in peers:
            await peer.connect()
        assert await _sessions(b) == 4
        for peer in peers:
            await peer.close()
