"""The server as one worker among many: announced in the registry (`--registry`) while it runs,
and drained on SIGTERM: no new call, the calls up finish (up to `--drain-timeout-s`), then exit."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from typing import Callable, Protocol

import structlog
from aiohttp import web

from config import AppConfig
from realtime.session import SessionRegistry
from realtime.session_homes import SessionHomes
from realtime.shared_transcripts import SharedTranscripts
from realtime.worker_registry import WorkerAnnouncer
from runtime.tasks import TaskOwner

ANNOUNCER = web.AppKey("announcer", WorkerAnnouncer)

log = structlog.get_logger()


class Mirrored(Protocol):
    def mirror(self, copy: Callable[[str, str], None]) -> None: ...


@dataclass(frozen=True)
class Shared:
    """What a worker reads of the others: their transcripts, and where their sessions lived."""

    transcripts: SharedTranscripts
    homes: SessionHomes


def advertised_url(config: AppConfig) -> str:
    server = config.server
    scheme = "https" if server.cert else "http"
    return config.worker.advertise_url or f"{scheme}://{server.host}:{server.port}"


def announce(app: web.Application, config: AppConfig, registry: SessionRegistry, transcripts: Mirrored) -> Shared | None:
    """With `--registry`: the app announces itself there from start-up to cleanup, copies the
    transcripts it writes to the store every worker reads, and reads the others' (returned)."""
    if config.worker.registry is None:
        return None
    url = advertised_url(config)
    announcer = WorkerAnnouncer(config.worker.registry, url, config.profile, registry, config.worker.heartbeat_s)
    registry.watch(announcer)
    app[ANNOUNCER] = announcer
    shared = Shared(SharedTranscripts(config.worker.registry), SessionHomes(config.worker.registry, url))
    transcripts.mirror(shared.transcripts.copy)

    async def announced(app: web.Application):
        tasks = TaskOwner("worker")
        tasks.spawn(announcer.run(), "announce")
        tasks.spawn(shared.transcripts.run(), "transcripts")
        yield
        await tasks.aclose()
        await shared.transcripts.aclose()
        await shared.homes.aclose()
        await announcer.aclose()

    app.cleanup_ctx.append(announced)
    return shared


async def drain(app: web.Application, registry: SessionRegistry, timeout_s: float) -> None:
    """Take no new call (and say so to the registry); wait for the calls up to end, `timeout_s`
    at most."""
    registry.draining = True
    if ANNOUNCER in app:
        app[ANNOUNCER].changed()
    log.info("server.draining", sessions=len(registry), timeout_s=timeout_s)
    try:
        await asyncio.wait_for(registry.empty.wait(), timeout_s)
    except TimeoutError:
        log.info("server.drain_timeout", sessions=len(registry))
        return
    log.info("server.drained")


def drain_on_sigterm(registry: SessionRegistry, timeout_s: float):
    """A cleanup context for the process that serves the app: SIGTERM drains it, then stops it as
    SIGINT does (the calls left are closed with `server_shutdown`, which the page redials)."""

    async def install(app: web.Application):
        tasks = TaskOwner("server")

        async def drain_then_stop() -> None:
            await drain(app, registry, timeout_s)
            signal.raise_signal(signal.SIGINT)

        def on_sigterm() -> None:
            if not registry.draining:
                tasks.spawn(drain_then_stop(), "drain")

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
        yield
        await tasks.aclose()

    return install
