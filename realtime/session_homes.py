"""Where each session lived, so that a request about it reaches its worker through any other.

A worker writes `voice:home:<session id>` = its advertised URL when a call opens, kept 30 days. A
worker asked about a session whose files it does not have (a call's recording: a WAV on the disk
of the worker that held it) reads that key and fetches the answer from the home worker, once: a
request that was already passed on is never passed on again. Whatever the proxy's stickiness
knows, and for every transport (`/ws` and `/v1/realtime` calls carry no session header for it).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import structlog
from aiohttp import web
from redis import asyncio as redis
from redis.exceptions import RedisError

from realtime.worker_registry import CONNECT_TIMEOUT_S, home_key

FORWARDED = "X-Voice-Forwarded"  # set on a request one worker passes to another
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=10)
PASSED_BACK = ("Content-Type", "Content-Disposition", "Content-Length", "Retry-After")
CHUNK_BYTES = 64 * 1024


class HomeUnreachable(Exception):
    """The worker that held the session did not answer (it is gone, or the network is)."""

    def __init__(self, session_id: str, url: str, error: BaseException) -> None:
        super().__init__(f"the worker that held session {session_id!r} ({url}) did not answer: {error!r}")


class SessionHomes:
    """Owns the lookups and the passing on: one Redis connection and one HTTP client for them."""

    def __init__(self, registry_url: str, own_url: str) -> None:
        self._client = redis.from_url(registry_url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
        self._own_url = own_url
        self._http: aiohttp.ClientSession | None = None
        self.log = structlog.get_logger()

    async def home(self, session_id: str) -> str | None:
        """The URL of the worker that held `session_id`; None if no worker wrote it or Redis is away."""
        try:
            return await self._client.get(home_key(session_id))
        except (RedisError, OSError) as exc:
            self.log.warning("homes.registry_unreachable", error=repr(exc))
            return None

    async def pass_on(self, request: web.Request, session_id: str) -> web.StreamResponse | None:
        """The home worker's answer to `request`, streamed back as it comes; None when this worker
        is the session's home, none is known, or the request was already passed on once."""
        if FORWARDED in request.headers:
            return None
        url = await self.home(session_id)
        if url is None or url.rstrip("/") == self._own_url.rstrip("/"):
            return None
        headers = {FORWARDED: "1"} | ({"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {})
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=FETCH_TIMEOUT)
        self.log.info("homes.passing_on", session_id=session_id, home=url, path=request.path)
        try:
            answer = await self._http.get(url.rstrip("/") + request.path_qs, headers=headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise HomeUnreachable(session_id, url, exc) from exc
        async with answer:  # cut short while streaming: the client sees it cut, as from the home itself
            response = web.StreamResponse(status=answer.status, headers=_passed_back(answer.headers))
            await response.prepare(request)
            async for chunk in answer.content.iter_chunked(CHUNK_BYTES):
                await response.write(chunk)
            await response.write_eof()
        return response

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
        await self._client.aclose()


def _passed_back(headers: Any) -> dict[str, str]:
    return {name: headers[name] for name in PASSED_BACK if name in headers}
