"""The interfaces of the models the controller drives: an LM streaming text, a decoder streaming PCM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncGenerator, AsyncIterator, Protocol

import numpy as np


class ModelSetupError(RuntimeError):
    """What a profile was pointed at cannot be used (a missing directory, a malformed voice file);
    the message says what and where."""


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class SpeechChunk:
    """Synthesized audio and the text it speaks (the context keeps only what was heard)."""

    pcm: np.ndarray  # mono float32 or int16
    sample_rate: int
    text: str

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / self.sample_rate


class LanguageModel(Protocol):
    """Streams the reply's text deltas; cancelling the consumer stops generation within one step.
    `max_new_tokens`, when given, replaces the model's own limit for this generation."""

    def stream(self, messages: list[Message], max_new_tokens: int | None = None) -> AsyncGenerator[str, None]: ...


class SpeechDecoder(Protocol):
    """Turns a stream of text deltas into a stream of speech chunks; cancelling drops pending work."""

    def synthesize(self, text: AsyncIterator[str]) -> AsyncGenerator[SpeechChunk, None]: ...
