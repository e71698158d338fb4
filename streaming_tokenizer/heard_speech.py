"""The utterance as speech, for an LM that hears it itself (Step-Audio 2): each whole window of it
handed to the model as soon as it is heard, the audio whole at the end, and a transcript made
beside the reply."""

from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

from runtime.audio import SAMPLE_RATE, to_float
from runtime.tasks import TaskOwner
from streaming_tokenizer.base import PartialCallback, StableCallback, UtteranceInput

Transcriber = Callable[[np.ndarray], Awaitable[str]]
Listener = Callable[[np.ndarray], Awaitable[None]]


class HeardSpeech:
    """Owns one session's open utterance: its 16 kHz frames as float samples, and the work that
    `listener` (the model's encoder) does on each whole window of `window_samples` (the model hears
    speech in such windows) while the user goes on, so that at the pause only the last is left. `finalize()` gives the samples as the turn's audio,
    with `transcriber` (the LM's own ASR prompt) as the way to its transcript, for the history and
    the client; without one the turn has no text."""

    def __init__(self, transcriber: Transcriber | None = None, listener: Listener | None = None, window_samples: int = 0) -> None:
        self._transcriber = transcriber
        self._listener = listener if window_samples > 0 else None
        self._window = window_samples
        self._frames: list[np.ndarray] = []
        self._samples = 0
        self._listened = 0  # samples handed to the listener, from the utterance's start
        self._tasks = TaskOwner("heard-speech")

    def begin(
        self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None, on_stable: StableCallback | None = None
    ) -> None:
        for task in self._tasks.tasks:  # the last utterance's windows are of no use now
            self._tasks.cancel(task)
        self._frames, self._samples, self._listened = [], 0, 0
        for frame in frames:
            self._add(frame)

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self._add(frame)

    def _add(self, frame: np.ndarray) -> None:
        self._frames.append(to_float(frame))
        self._samples += len(frame)
        if self._listener is not None and self._samples - self._listened >= self._window:
            start, self._listened = self._listened, self._listened + self._window
            window = np.concatenate(self._frames)[start : self._listened]
            self._tasks.spawn(self._listener(window), f"window@{start // SAMPLE_RATE}s")

    async def finalize(self) -> UtteranceInput:
        audio = np.concatenate(self._frames) if self._frames else np.zeros(0, np.float32)
        transcriber = self._transcriber
        if transcriber is None or not len(audio):
            return UtteranceInput("", audio=audio)

        async def transcribe() -> str:
            return await transcriber(audio)

        return UtteranceInput("", transcribe=transcribe, audio=audio)

    async def aclose(self) -> None:
        await self._tasks.aclose()
        self._frames = []
