"""Shared fixtures: a real server on 127.0.0.1 (loopback ICE) running in the test's event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

from config import AppConfig, LoopbackConfig, ModelConfig, ServerConfig, WorkerConfig
from context.dialog import TranscriptStore
from controller.loopback import LoopbackAgent
from realtime.server import REGISTRY, build_app
from realtime.session import AgentFactory, SessionRegistry

if TYPE_CHECKING:
    from profiles.embedded import EmbeddedModels

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("unit", "models", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test sits in exactly one tier, so that `-m unit` (make test-fast) leaves none out by accident."""
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")


@dataclass
class RunningServer:
    url: str
    app: web.Application
    config: AppConfig

    @property
    def registry(self) -> SessionRegistry:
        return self.app[REGISTRY]


ServerStarter = Callable[..., Any]


@pytest.fixture
async def start_server(tmp_path) -> AsyncIterator[ServerStarter]:
    """Start servers with config overrides; all of them stop (and close their sessions) at teardown."""
    runners: list[web.AppRunner] = []

    async def start(
        factory: AgentFactory | None = None,
        call_share: float = 0.0,
        tracer_provider: Any = None,
        worker: WorkerConfig | None = None,
        transcripts: TranscriptStore | None = None,
        **server_overrides: Any,
    ) -> RunningServer:
        server = dataclasses.replace(
            ServerConfig(port=0, loopback_ice=True, data_dir=tmp_path / "data", max_load=None), **server_overrides
        )
        config = AppConfig(profile="loopback", server=server, loopback=LoopbackConfig(delay_ms=300), worker=worker or WorkerConfig())
        app = build_app(
            config,
            factory or (lambda io: LoopbackAgent(io, config.loopback)),
            transcripts or TranscriptStore(server.data_dir),
            call_share,
            tracer_provider,
        )
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]
        return RunningServer(f"http://127.0.0.1:{port}", app, config)

    yield start
    for runner in runners:
        # A shutdown that hangs must fail this test and name what it waits on, not wedge the run.
        try:
            async with asyncio.timeout(15):
                await runner.cleanup()
        except TimeoutError:
            pending = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            pytest.fail(f"server shutdown hung; pending tasks: {pending}")


@pytest.fixture(scope="session")
def embedded_models() -> Iterator[EmbeddedModels]:
    """The embedded profile's real models, loaded once for the whole run."""
    from profiles.embedded import load_embedded
    from profiles.loaded import close_models

    models = asyncio.run(load_embedded(ModelConfig()))
    yield models
    asyncio.run(close_models(models))


@pytest.fixture(scope="session")
def whisper_engine() -> Iterator[Any]:
    """Whisper tiny.en (`--asr whisper`), also the harness's judge of the agent's received speech."""
    from profiles.embedded import whisper_model_dir
    from runtime.workers import ModelWorker
    from streaming_tokenizer.whisper import WhisperEngine

    worker = ModelWorker("whisper-test")
    yield worker.submit(WhisperEngine, whisper_model_dir(), 1, worker).result()
    worker.close()


@pytest.fixture(scope="session")
def whisper_base_engine() -> Iterator[Any]:
    """Whisper base (`--asr whisper-base`), as the profile loads it."""
    from config import ModelConfig
    from profiles.embedded import load_asr
    from runtime.workers import ModelWorker

    worker = ModelWorker("whisper-base-test")
    yield worker.submit(load_asr, ModelConfig(asr="whisper-base"), worker, 1).result()
    worker.close()


@pytest.fixture
async def server(start_server: ServerStarter) -> RunningServer:
    return await start_server()
