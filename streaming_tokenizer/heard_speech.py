"""The utterance as speech, for an LM that hears it itself (Step-Audio 2): nothing to tokenize while
the user speaks, the audio whole at the end, and a transcript made beside the reply."""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

from runtime.audio import to_float
from streaming_tokenizer.base import PartialCallback, UtteranceInput

Transcriber = Callable[[np.ndarray], Awaitable[str]]


class HeardSpeech:
    """Owns one session's open utterance: its 16 kHz frames as float samples. `finalize()` gives
    them as the turn's audio, with `transcriber` (the LM's own ASR prompt) as the way to its
    transcript, for the history and the client; without one the turn has no text."""

    def __init__(self, transcriber: Transcriber | None = None) -> None:
        self._transcriber = transcriber
        self._frames: list[np.ndarray] = []

    def begin(self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None) -> None:
        self._frames = [to_float(frame) for frame in frames]

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self._frames.append(to_float(frame))

    async def finalize(self) -> UtteranceInput:
        audio = np.concatenate(self._frames) if self._frames else np.zeros(0, np.float32)
        transcriber = self._transcriber
        if transcriber is None or not len(audio):
            return UtteranceInput("", audio=audio)

        async def transcribe() -> str:
            return await transcriber(audio)

        return UtteranceInput("", transcribe=transcribe, audio=audio)

    async def aclose(self) -> None:
        self._frames = []
