"""Wiring: which engines each profile (embedded, loopback, stepaudio, stepaudio2) builds from the configuration,
and the agent it hands each session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from config import AppConfig
from context.dialog import DialogContext, TranscriptStore
from controller.controller import Controller
from profiles.loaded import LoadedModels, close_models, for_session
from models.base import ModelSetupError
from realtime.session import AgentFactory, SessionIO
from tools.toolbox import ToolSetupError, load_toolbox

if TYPE_CHECKING:
    from profiles.embedded import EmbeddedModels


@dataclass
class Profile:
    """Owns what a profile loaded at startup; aclose() frees it when the server stops."""

    name: str
    factory: AgentFactory
    aclose: Callable[[], Awaitable[None]]
    models: LoadedModels | None = None  # what it loaded, for tests and diagnostics

    @property
    def turn_cpu_s(self) -> float:
        """What one call's turn costs this machine (0: no models, or not timed)."""
        return self.models.turn_cpu_s if self.models is not None else 0.0


async def _nothing() -> None:
    return None


def conversation(config: AppConfig, store: TranscriptStore, models: LoadedModels) -> AgentFactory:
    """The factory of a talking profile's agent: a Controller over the profile's models, with the
    session's own history."""

    m = config.models
    try:
        tools = load_toolbox(m.tools, m.builtin_tools, m.tool_timeout_s, m.tool_filler_ms)
    except ToolSetupError as exc:
        raise ModelSetupError(str(exc)) from None

    def agent(io: SessionIO) -> Controller:
        context = DialogContext(config.models.system_prompt, config.models.history_tokens, store, io.session_id)
        return Controller(io, for_session(models, config.turn, tools), context, config.turn, config.profile)

    return agent


async def open_profile(
    config: AppConfig, store: TranscriptStore, models: EmbeddedModels | None = None
) -> Profile:
    """Load what the profile needs; `models`, when given, are already loaded and stay their owner's."""
    if config.profile == "loopback":
        from profiles.loopback import loopback

        return Profile("loopback", loopback(config.loopback), _nothing)
    if config.profile == "embedded":
        from profiles.embedded import load_embedded

        loaded = models or await load_embedded(config.models)
        owned = models is None
        return Profile("embedded", conversation(config, store, loaded), (lambda: close_models(loaded)) if owned else _nothing, loaded)
    if config.profile == "stepaudio":
        from profiles.stepaudio import load_stepaudio

        stepaudio = await load_stepaudio(config.stepaudio, config.models)
        return Profile("stepaudio", conversation(config, store, stepaudio), lambda: close_models(stepaudio), stepaudio)
    if config.profile == "stepaudio2":
        from profiles.stepaudio2 import load_stepaudio2

        assert config.stepaudio.model_path is not None  # the configuration checks it
        stepaudio2 = await load_stepaudio2(config.stepaudio2, config.stepaudio.model_path, config.models)
        return Profile("stepaudio2", conversation(config, store, stepaudio2), lambda: close_models(stepaudio2), stepaudio2)
    raise ValueError(f"unknown profile {config.profile!r}")
