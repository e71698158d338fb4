"""Transcripts every worker can read: each record a worker writes to its own JSONL file is copied,
in order, to a Redis list (`voice:transcript:<session id>`), so that
`/api/sessions/<id>/transcript` answers through any worker, after the call and after its worker
has gone."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from redis import asyncio as redis
from redis.exceptions import RedisError

from realtime.worker_registry import CONNECT_TIMEOUT_S, KEEP_S, PREFIX
from runtime.transcripts import fold_transcript

RETRY_S = 1.0  # Redis out of reach: the records wait, and are tried again this often
FLUSH_S = 2.0  # at shutdown, how long the records still waiting may take


def transcript_key(session_id: str) -> str:
    return f"{PREFIX}transcript:{session_id}"


class SharedTranscripts:
    """Owns the copies: records queued as they are written (a call never waits on Redis), pushed in
    order by one task, kept while Redis is out of reach; and reading them back."""

    def __init__(self, url: str) -> None:
        self._client = redis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
        self._waiting: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._batch: list[tuple[str, str]] = []  # taken from the queue, not yet written
        self._reachable = True
        self.log = structlog.get_logger()

    def copy(self, session_id: str, line: str) -> None:
        """A record just written (a JSON line) of `session_id`'s transcript."""
        self._waiting.put_nowait((session_id, line))

    async def run(self) -> None:
        """Push what is written, as it is written, until cancelled."""
        while True:
            self._batch = [await self._waiting.get()]
            while not self._waiting.empty():
                self._batch.append(self._waiting.get_nowait())
            while not await self._push(self._batch):
                await asyncio.sleep(RETRY_S)
            self._batch = []

    async def _push(self, batch: list[tuple[str, str]]) -> bool:
        pipe = self._client.pipeline(transaction=True)  # all of the batch or none: a retry never doubles a record
        for session_id, line in batch:
            pipe.rpush(transcript_key(session_id), line)
            pipe.expire(transcript_key(session_id), KEEP_S)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            if self._reachable:
                self.log.warning("transcripts.store_unreachable", error=repr(exc), waiting=len(batch))
            self._reachable = False
            return False
        if not self._reachable:
            self.log.info("transcripts.store_reached", written=len(batch))
        self._reachable = True
        return True

    async def read(self, session_id: str) -> list[dict[str, Any]] | None:
        """The session's turns as any worker wrote them, or None if none did."""
        lines = await self._client.lrange(transcript_key(session_id), 0, -1)
        return fold_transcript(lines, session_id) if lines else None

    async def aclose(self) -> None:
        """Push what still waits (for `FLUSH_S` at most), then close the connection."""
        batch, self._batch = self._batch, []
        while not self._waiting.empty():
            batch.append(self._waiting.get_nowait())
        try:
            if batch and not await asyncio.wait_for(self._push(batch), FLUSH_S):
                self.log.warning("transcripts.records_lost", records=len(batch))
        except TimeoutError:
            self.log.warning("transcripts.records_lost", records=len(batch))
        finally:
            await self._client.aclose()
