"""Many workers behind one address: each announces itself in Redis (`--registry`) with a record
that lapses unless renewed, and the sessions it holds, so that a proxy or a router finds a worker
with room for a new call and the worker that holds a session.

The layout, under `voice:`:
- `worker:<id>`: a hash (the worker's `WorkerRecord`), expiring three heartbeats after it was last written;
- `workers`: a sorted set of the worker ids, scored by the time of their last heartbeat (ms);
- `session:<session id>`: the id of the worker that holds it, expiring as the worker's record does;
- `home:<session id>`: the URL of the worker that held it, kept `KEEP_S` (its files are there).
A worker that dies leaves keys that lapse on their own; its id leaves `workers` when a reader next
finds its record gone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import structlog
from redis import asyncio as redis
from redis.exceptions import RedisError

from realtime.events import ServerEvent
from realtime.session import Session, SessionRegistry

PREFIX = "voice:"
WORKERS = PREFIX + "workers"
MISSED_BEATS = 3  # a record lapses after this many heartbeats are missed
CONNECT_TIMEOUT_S = 2.0
KEEP_S = 30 * 24 * 3600  # what outlives a call (its transcript, where it lived) stays 30 days


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def session_key(session_id: str) -> str:
    return f"{PREFIX}session:{session_id}"


def home_key(session_id: str) -> str:
    return f"{PREFIX}home:{session_id}"


@dataclass(frozen=True)
class WorkerRecord:
    """What a worker says of itself at each heartbeat."""

    id: str
    url: str
    profile: str
    sessions: int
    max_sessions: int
    admitting: bool
    draining: bool
    load: float | None  # the highest share of the machine measured (None: no load monitor)
    heartbeat_ms: int

    def to_redis(self) -> dict[str, str]:
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> WorkerRecord:
        return cls(**{key: json.loads(value) for key, value in fields.items()})


class WorkerAnnouncer:
    """Owns this worker's entries in the registry: its record, renewed every `heartbeat_s` and at
    once when a call opens or closes or it starts to drain; the sessions it holds; and their
    removal when it stops. Redis out of reach is logged and retried: the calls go on."""

    def __init__(self, url: str, advertise_url: str, profile: str, registry: SessionRegistry, heartbeat_s: float) -> None:
        self.id = f"wrk_{uuid.uuid4().hex[:12]}"
        self._client = redis.from_url(url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S)
        self._advertise_url = advertise_url
        self._profile = profile
        self._registry = registry
        self._heartbeat_s = heartbeat_s
        self._changed = asyncio.Event()
        self._gone: set[str] = set()  # sessions closed since the last heartbeat
        self._opened: set[str] = set()  # sessions opened whose home is not yet written
        self._reachable = True
        self.log = structlog.get_logger().bind(worker_id=self.id)

    # SessionWatcher: a call opening or closing is written at once.
    def opened(self, session: Session) -> None:
        self._gone.discard(session.id)
        self._opened.add(session.id)
        self._changed.set()

    def event(self, session: Session, event: ServerEvent) -> None:
        pass

    def closed(self, session: Session) -> None:
        self._gone.add(session.id)
        self._changed.set()

    def changed(self) -> None:
        """Something the record says changed (the worker started draining): written at once."""
        self._changed.set()

    def record(self) -> WorkerRecord:
        health = self._registry.health()
        load = health.get("load")
        return WorkerRecord(
            id=self.id, url=self._advertise_url, profile=self._profile, sessions=health["sessions"],
            max_sessions=health["max_sessions"], admitting=health["admitting"], draining=health["draining"],
            load=None if load is None else load["load"], heartbeat_ms=int(time.time() * 1000),
        )

    async def run(self) -> None:
        """Announce, then renew, until cancelled."""
        self.log.info("worker.registering", url=self._advertise_url)
        while True:
            self._changed.clear()
            await self._beat()
            try:
                await asyncio.wait_for(self._changed.wait(), self._heartbeat_s)
            except TimeoutError:
                pass

    async def _beat(self) -> None:
        record, gone, opened = self.record(), set(self._gone), set(self._opened)
        ttl_ms = int(self._heartbeat_s * MISSED_BEATS * 1000)
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(worker_key(self.id), mapping=record.to_redis())
        pipe.pexpire(worker_key(self.id), ttl_ms)
        if record.draining:  # no new call is sent here; the sessions it holds still find it
            pipe.zrem(WORKERS, self.id)
        else:
            pipe.zadd(WORKERS, {self.id: record.heartbeat_ms})
        for session in self._registry:
            pipe.set(session_key(session.id), self.id, px=ttl_ms)
        for session_id in gone:
            pipe.delete(session_key(session_id))
        for session_id in opened:
            pipe.set(home_key(session_id), self._advertise_url, ex=KEEP_S)
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            if self._reachable:
                self.log.warning("worker.registry_unreachable", error=repr(exc))
            self._reachable = False
            return
        self._gone -= gone
        self._opened -= opened
        if not self._reachable:
            self.log.info("worker.registry_reached")
        self._reachable = True

    async def aclose(self) -> None:
        """Leave the registry (the sessions, by then closed, with it) and close the connection."""
        try:
            keys = [worker_key(self.id), *(session_key(s) for s in self._gone), *(session_key(s.id) for s in self._registry)]
            await self._client.delete(*keys)
            await self._client.zrem(WORKERS, self.id)
            self.log.info("worker.deregistered")
        except (RedisError, OSError) as exc:
            self.log.warning("worker.deregister_failed", error=repr(exc))
        finally:
            await self._client.aclose()


async def live_workers(client: Any) -> list[WorkerRecord]:
    """The workers whose record has not lapsed, most recently renewed first; lapsed ones are
    dropped from `workers` on the way."""
    records = []
    for worker_id in await client.zrevrange(WORKERS, 0, -1):
        fields = await client.hgetall(worker_key(worker_id))
        if not fields:
            await client.zrem(WORKERS, worker_id)
            continue
        records.append(WorkerRecord.from_redis(fields))
    return records


async def session_worker(client: Any, session_id: str) -> str | None:
    """The id of the worker holding `session_id`, if one does."""
    value = await client.get(session_key(session_id))
    return None if value is None else str(value)
