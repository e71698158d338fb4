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
from redis import asyncio as redis

from realtime.webrtc import use_loopback_ice_only
from realtime.worker_registry import live_workers, session_worker, worker_key
from testkit.local import free_port
from testkit.peer import ClientPeer, OfferRefused
from testkit.ws_peer import WsPeer
from tests.test_lm_backends import running_lm_server
from tests.test_openai_realtime import client, next_of
from tests.test_worker import _tone, redis_url, registered, running_worker, until  # noqa: F401 (a fixture)

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


async def _recording(url: str, session_id: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/sessions/{session_id}/recording") as response:
        return response.status, await response.read()


async def test_a_calls_recording_is_fetched_through_any_worker(tmp_path, redis_url):
    """A /ws call carries no session header for the proxy to stick to: its recording, on the disk
    of the worker that held it, is fetched from there by whichever worker is asked; once that
    worker is gone, the others say so (502), not 404."""
    flags = ("--record", *registered(redis_url))
    async with (
        running_worker(tmp_path, *flags) as (process_a, a),
        running_worker(tmp_path, *flags) as (process_b, b),
        haproxy(a, b) as front,
    ):
        peer = WsPeer(front)
        session_id = await peer.connect()
        peer.speak(_tone(), 16000)
        await peer.changed.wait_for(lambda: len(peer.received) > 50, 10)  # the loopback agent's echo
        (home, process), other = ((a, process_a), b) if await _sessions(a) == 1 else ((b, process_b), a)
        await peer.close()

        async def ready() -> bytes | None:
            status, body = await _recording(home, session_id)
            return body if status == 200 else None

        wav = await until(ready, 10, "the recording is ready once the call ended")
        assert wav[:4] == b"RIFF" and len(wav) > 48000
        assert [await _recording(front, session_id) for _ in range(4)] == [(200, wav)] * 4
        assert await _recording(other, session_id) == (200, wav)
        assert not list((tmp_path / f"data-{other.rsplit(':', 1)[1]}").glob("**/*.wav"))  # it kept no copy
        async with aiohttp.ClientSession() as http:  # passed on once at most: never around in a loop
            forwarded = await http.get(f"{other}/api/sessions/{session_id}/recording", headers={"X-Voice-Forwarded": "1"})
            assert forwarded.status == 404
        process.send_signal(signal.SIGKILL)
        await process.wait()
        status, body = await _recording(other, session_id)
        assert status == 502 and b"worker_unreachable" in body


@contextlib.asynccontextmanager
async def text_call(url: str) -> AsyncIterator[tuple[Any, str]]:
    """A `/v1/realtime` session through the `openai` SDK, text in and out; its connection and id."""
    async with client(url).realtime.connect(model="embedded") as connection:
        created = await next_of(connection, "session.created")
        await connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await next_of(connection, "session.updated")
        yield connection, created.session.model_extra["id"]


async def ask(connection: Any, question: str) -> str:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}
    await connection.conversation.item.create(item=item)
    await connection.response.create()
    done = await next_of(connection, "response.done", timeout=90)
    assert done.response.status == "completed", done.response
    return done.response.output[0].content[0].text


async def test_the_whole_service_on_one_machine(tmp_path, redis_url):
    """Redis, HAProxy, one shared LM server and two embedded workers using it, as processes: calls
    land on both; a full worker sends the next to the other; a drained worker's call finishes
    while new calls go elsewhere; its transcript is read through the other; a killed worker lapses
    from the registry and a new call succeeds on the worker that took its place."""
    registry = redis.from_url(redis_url, decode_responses=True)
    async with running_lm_server(slots=2, threads=1) as (_, lm_url):
        flags = ("--profile", "embedded", "--lm", "openai", "--lm-url", lm_url, "--model-threads", "1",
                 "--max-sessions", "1", "--drain-timeout-s", "60", *registered(redis_url))
        b_port = free_port()
        async with (
            running_worker(tmp_path, *flags, ready_s=240) as (process_a, a),
            running_worker(tmp_path, *flags, port=b_port, ready_s=240) as (process_b, b),
            haproxy(a, b) as front,
        ):
            ids = {w.url: w.id for w in await until(lambda: _both(registry), 5, "both workers registered")}
            async with text_call(front) as (first, first_id), text_call(front) as (second, second_id):
                holders = {await session_worker(registry, first_id), await session_worker(registry, second_id)}
                assert holders == {ids[a], ids[b]}  # one call on each
                with pytest.raises(Exception, match="503"):  # both full: refused
                    async with text_call(front):
                        pass
                answers = await asyncio.gather(ask(first, "What is the capital of France?"), ask(second, "Name a colour."))
                assert all(answer.strip() for answer in answers), answers  # both answered by the one LM server

                # SIGTERM the worker holding the second call: it finishes, new calls go to the other.
                draining, left = (process_b, a) if await session_worker(registry, second_id) == ids[b] else (process_a, b)
                draining.send_signal(signal.SIGTERM)
                await until(lambda: _draining(b if left == a else a), 5, "the worker drains")
                assert (await ask(second, "And a fruit?")).strip()
                await first.close()
                await until(lambda: _sessions_of(registry, ids[left], 0), 5, "the first call's worker freed")
                async with text_call(front) as (_, third_id):
                    assert await session_worker(registry, third_id) == ids[left]
                await second.close()
                assert await asyncio.wait_for(draining.wait(), 30) == 0

            # The drained worker is gone; the transcript it wrote is read through the proxy.
            async with aiohttp.ClientSession() as http, http.get(f"{front}/api/sessions/{second_id}/transcript") as response:
                turns = (await response.json())["turns"]
            assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]

            # SIGKILL the other; a worker restarted on the drained one's address takes the new calls.
            killed = process_a if left == a else process_b
            restarted_port = int((b if left == a else a).rsplit(":", 1)[1])
            killed.send_signal(signal.SIGKILL)
            await killed.wait()
            await until(lambda: _gone(registry, ids[left]), 1.5, "the killed worker lapsed from the registry")
            async with running_worker(tmp_path, *flags, port=restarted_port, ready_s=240):
                await until(lambda: _answers(front), 10, "the proxy saw the restarted worker")
                async with text_call(front) as (call, _):
                    assert (await ask(call, "What is two plus two?")).strip()
    await registry.aclose()


async def _both(registry: Any) -> Any:
    workers = await live_workers(registry)
    return workers if len(workers) == 2 else None


async def _sessions_of(registry: Any, worker_id: str, sessions: int) -> bool:
    fields = await registry.hgetall(worker_key(worker_id))
    return bool(fields) and int(fields["sessions"]) == sessions


async def _gone(registry: Any, worker_id: str) -> bool:
    return not await registry.exists(worker_key(worker_id)) and worker_id not in {w.id for w in await live_workers(registry)}


async def _answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False

