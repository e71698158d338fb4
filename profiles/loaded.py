"""What every profile that talks loads once per server, and hands each session."""

from __future__ import annotations

from typing import Protocol

from config import TurnConfig
from controller.reply import SessionModels
from models.base import LanguageModel, PromptCache, SpeechDecoder
from runtime.workers import ModelWorker
from streaming_tokenizer.base import StreamingTokenizer
from tools.toolbox import Toolbox
from turns.judge import TurnEndScorers
from vad.engines import make_detector


class LoadedModels(Protocol):
    """The shared models of a profile and the worker threads they run in."""

    workers: tuple[ModelWorker, ...]
    turn_end: TurnEndScorers | None  # what semantic turn detection judges with, if anything
    turn_cpu_s: float  # what one call's turn costs this machine (timed at start-up; 0: not timed)

    @property
    def lm(self) -> LanguageModel:
        """The LM engine that writes the replies."""
        ...

    @property
    def reply_lm(self) -> LanguageModel:
        """What answers each session: the engine, or the engine with the profile's reply shaping."""
        ...

    @property
    def decoder(self) -> SpeechDecoder: ...

    @property
    def engines(self) -> tuple[LanguageModel, ...]:
        """The LM engines it loaded (freed at the end)."""
        ...

    def session_tokenizer(self) -> StreamingTokenizer:
        """A new tokenizer for one session (it holds that session's state)."""
        ...


def for_session(models: LoadedModels, turn: TurnConfig, tools: Toolbox | None = None) -> SessionModels:
    """One session's handles: its own detector and tokenizer, the shared LM, decoder and tools."""
    return SessionModels(
        make_detector(turn.endpointing.vad, turn.endpointing.webrtc_aggressiveness),
        models.session_tokenizer(),
        models.reply_lm,
        models.decoder,
        models.turn_end,
        tools,
        models.lm if isinstance(models.lm, PromptCache) else None,
    )


async def close_models(models: LoadedModels) -> None:
    """Free what the profile loaded: every worker thread (their calls finish first), then each
    engine closes itself (piper's process, the LMs' connections or contexts)."""
    for worker in models.workers:
        worker.close()
    for engine in (*models.engines, models.decoder):
        await engine.aclose()
