"""The server as one worker among many: announced in the registry (`--registry`) while it runs,
and drained on SIGTERM: no new call, the calls up finish (up to `--drain-timeout-s`), then exit."""

from __future__ import annotations

import asyncio
import signal
from typing import Callable, Protocol

import structlog
from aiohttp import web

from config import AppConfig
from realtime.session import SessionRegistry
from realtime.shared_transcripts import SharedTranscripts
from realtime.worker_registry import WorkerAnnouncer
from runtime.tasks import TaskOwner

ANNOUNCER = web.AppKey("announcer", WorkerAnnouncer)

log = structlog.get_logger()


class Mirrored(Protocol):
    def mirror(self, copy: Callable[[str, str], None]) -> None: ...


def advertised_url(config: AppConfig) -> str:
    server = config.server
    scheme = "https" if server.cert else "http"
    return config.worker.advertise_url or f"{scheme}://{server.host}:{server.port}"


def announce(app: web.Application, config: AppConfig, registry: SessionRegistry, transcripts: Mirrored) -> SharedTranscripts | None:
    """With `--registry`: the app announces itself there from start-up to cleanup, and copies the
    transcripts it writes to the store every worker reads (returned)."""
    if config.worker.registry is None:
        return None
    announcer = WorkerAnnouncer(config.worker.registry, advertised_url(config), config.profile, registry, config.worker.heartbeat_s)
    registry.watch(announcer)
    app[ANNOUNCER] = announcer
    shared = SharedTranscripts(config.worker.registry)
    transcripts.mirror(shared.copy)

    async def announced(app: web.Application):
        tasks = TaskOwner("worker")
        tasks.spawn(announcer.run(), "announce")
        tasks.spawn(shared.run(), "transcripts")
        yield
        await tasks.aclose()
        await shared.aclose()
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
