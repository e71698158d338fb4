"""What each profile builds: the per-call agent, and the shared models behind it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from config import AppConfig
from context.dialog import DialogContext, TranscriptStore
from controller.controller import Controller
from realtime.session import AgentFactory, SessionIO

if TYPE_CHECKING:
    from models.embedded import EmbeddedModels


@dataclass
class Profile:
    """Owns what a profile loaded at startup; aclose() frees it when the server stops."""

    name: str
    factory: AgentFactory
    aclose: Callable[[], Awaitable[None]]
    models: object | None = None  # what it loaded, for tests and diagnostics


async def _nothing() -> None:
    return None


async def open_profile(
    config: AppConfig, store: TranscriptStore, models: EmbeddedModels | None = None
) -> Profile:
    """Load what the profile needs; `models`, when given, are already loaded and stay their owner's."""
    if config.profile == "loopback":
        from controller.loopback import LoopbackAgent

        return Profile("loopback", lambda io: LoopbackAgent(io, config.loopback), _nothing)
    if config.profile == "embedded":
        from models.embedded import load_embedded

        owned = models is None
        loaded = models or await load_embedded(config.models, config.server.data_dir)

        def agent(io: SessionIO) -> Controller:
            context = DialogContext(config.models.system_prompt, config.models.history_tokens, store, io.session_id)
            return Controller(io, loaded.for_session(config.turn), context, config.turn, "embedded")

        return Profile("embedded", agent, loaded.aclose if owned else _nothing)
    if config.profile == "stepaudio":
        from models.stepaudio import load_stepaudio

        stepaudio = await load_stepaudio(config.stepaudio, config.models)

        def stepaudio_agent(io: SessionIO) -> Controller:
            context = DialogContext(config.models.system_prompt, config.models.history_tokens, store, io.session_id)
            return Controller(io, stepaudio.for_session(config.turn), context, config.turn, "stepaudio")

        return Profile("stepaudio", stepaudio_agent, stepaudio.aclose, stepaudio)
    raise ValueError(f"unknown profile {config.profile!r}")
