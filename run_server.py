"""Run the voice agent server: parse the configuration, build the app for the profile, serve."""

from __future__ import annotations

import logging
import sys

import structlog
from aiohttp import web

from config import AppConfig, ConfigError, load_config
from context.dialog import TranscriptStore
from models.base import ModelSetupError
from profiles import open_profile
from realtime.capacity import call_share
from realtime.server import REGISTRY, build_app, ssl_context
from realtime.worker import drain_on_sigterm
from runtime.memory import freeze_what_lives_on, release_free_memory_every
from runtime.tasks import TaskOwner

# How often the C heap's free pages go back to the system (runtime/memory.py): ~50 MB at 8 calls.
MEMORY_RELEASE_PERIOD_S = 60.0


def configure_logging(json_lines: bool, level: str) -> None:
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def prepare_data_dir(config: AppConfig) -> None:
    try:
        config.server.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot create {config.server.data_dir}: {exc.strerror}") from None


async def serve_profile(config: AppConfig, store: TranscriptStore) -> web.Application:
    """Load the profile (models included), then build the app around it; the models go at cleanup."""
    profile = await open_profile(config, store)
    app = build_app(config, profile.factory, store, call_share(profile.turn_cpu_s))

    async def close_profile(app: web.Application) -> None:
        await profile.aclose()

    app.on_cleanup.append(close_profile)

    async def release_memory(app: web.Application):
        tasks = TaskOwner("server")
        tasks.spawn(release_free_memory_every(MEMORY_RELEASE_PERIOD_S), "memory-release")
        yield
        await tasks.aclose()

    app.cleanup_ctx.append(release_memory)
    app.cleanup_ctx.append(drain_on_sigterm(app[REGISTRY], config.worker.drain_timeout_s))
    freeze_what_lives_on()
    scheme = "https" if config.server.cert else "http"
    structlog.get_logger().info("server.listening", url=f"{scheme}://{config.server.host}:{config.server.port}")
    return app


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        prepare_data_dir(config)
        configure_logging(config.log.json, config.log.level)
        context = ssl_context(config)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"run_server.py: {exc}", file=sys.stderr)
        return 2
    structlog.get_logger().info("server.config", **config.describe())
    store = TranscriptStore(config.server.data_dir)
    try:
        web.run_app(
            serve_profile(config, store),
            host=config.server.host,
            port=config.server.port,
            ssl_context=context,
            print=None,
            access_log=None,
        )
    except ModelSetupError as exc:
        print(f"run_server.py: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
