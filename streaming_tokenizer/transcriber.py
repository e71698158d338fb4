"""Streaming transcription with any whole-utterance ASR engine: partial transcripts while the user
speaks, a final one at the pause that reuses an eager transcription when it already covers every
voiced frame."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np
import structlog

from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.base import PartialCallback, UtteranceInput

log = structlog.get_logger()

# Silence kept after the last voiced frame (the VAD's own hangover adds ~100 ms more): longer
# trailing silence makes the engines invent a word ("You", "Thank you").
TAIL_FRAMES = 2


class TranscriptionEngine(Protocol):
    """An ASR model shared by every session, transcribing whole utterances in its worker."""

    worker: ModelWorker

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        """16 kHz int16 or float PCM to text; a `draft` may trade accuracy for speed."""
        ...


class StreamingTranscriber:
    """One session's streaming transcription; owns its one background transcription at a time.

    The engines are not incremental, so the work it can reuse is a whole transcript: while the user
    speaks, each `partial_ms` of new audio starts a quick draft of the utterance so far (only when
    the worker is idle: partials never delay anyone's final); `settle_ms` into a silence, a full
    transcription starts eagerly. finalize() waits for that one when it covers the last voiced
    frame, so the transcript is usually ready before the endpointer even asks (60 ms: done by the
    120 ms pause at which semantic turn detection starts its speculative reply).
    """

    def __init__(self, engine: TranscriptionEngine, partial_ms: int = 500, settle_ms: int = 60) -> None:
        self._engine = engine
        self._partial_frames = max(1, partial_ms // FRAME_MS)
        self._settle_frames = max(1, settle_ms // FRAME_MS)
        self._frames: list[np.ndarray] = []
        self._voiced_end = 0  # frames up to and including the last voiced one
        self._started_at = 0  # frame count the newest transcription started from
        self._tasks = TaskOwner("asr")
        self._job: asyncio.Task[None] | None = None
        self._job_covers = 0
        self._result: tuple[int, str] | None = None  # (frames covered, text) of this utterance
        self._utterance = 0
        self._on_partial: PartialCallback | None = None
        self._finalized = False  # no partial may follow a final until more audio comes
        self._closed = False

    def begin(self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None) -> None:
        self._utterance += 1  # a transcription still running for the last utterance is ignored
        self._frames = list(frames)
        self._voiced_end = len(self._frames)
        self._started_at = 0
        self._result = None
        self._on_partial = on_partial
        self._finalized = False

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self._frames.append(frame)
        self._finalized = False
        if voiced:
            self._voiced_end = len(self._frames)
        if self._closed or (self._job is not None and not self._job.done()):
            return
        silent_run = len(self._frames) - self._voiced_end
        if silent_run >= self._settle_frames and not self._covered():
            self._start(draft=False)
        elif (
            voiced
            and len(self._frames) - self._started_at >= self._partial_frames
            and self._engine.worker.busy == 0
        ):
            self._start(draft=True)

    def _covered(self) -> bool:
        return self._result is not None and self._result[0] >= self._voiced_end

    def _speech(self) -> np.ndarray:
        """The utterance so far, without the silence after its last voiced frame."""
        return np.concatenate(self._frames[: self._voiced_end + TAIL_FRAMES])

    def _start(self, draft: bool) -> None:
        self._started_at = len(self._frames)
        self._job_covers = 0 if draft else len(self._frames)  # a draft is never the final
        audio = self._speech()
        self._job = self._tasks.spawn(self._transcribe(audio, len(self._frames), self._utterance, draft), "transcribe")

    async def _transcribe(self, audio: np.ndarray, covers: int, utterance: int, draft: bool) -> None:
        try:
            text = await self._engine.transcribe(audio, draft)
        except Exception as exc:  # a lost partial is not worth a session: finalize transcribes again
            log.warning("asr.partial_failed", error=repr(exc))
            return
        if utterance != self._utterance:
            return
        if not draft:
            self._result = (covers, text)
        if self._on_partial is not None and text and not self._finalized:
            self._on_partial(UtteranceInput(text))

    async def finalize(self) -> UtteranceInput:
        self._finalized = True
        job = self._job
        if job is not None and not job.done() and self._job_covers >= self._voiced_end:
            # Shielded: a cancelled speculation must not kill work the next finalize can reuse.
            await asyncio.shield(job)
        if self._result is not None and self._covered():
            return UtteranceInput(self._result[1])
        covers = len(self._frames)
        text = await self._engine.transcribe(self._speech()) if self._frames else ""
        self._result = (covers, text)
        return UtteranceInput(text)

    async def aclose(self) -> None:
        self._closed = True
        await self._tasks.aclose()
