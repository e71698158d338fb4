"""Streaming transcription with any whole-utterance ASR engine: partial transcripts while the user
speaks, and a final one at the pause whose cost does not grow with the utterance: what was said
before an earlier pause is transcribed once, while the user goes on, and kept."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.base import PartialCallback, StableCallback, UtteranceInput

log = structlog.get_logger()

# Silence kept after the last voiced frame (the VAD's own hangover adds ~100 ms more): longer
# trailing silence makes the engines invent a word ("You", "Thank you").
TAIL_FRAMES = 2
# A long utterance is cut where the user paused this long, once the part before holds this much
# speech: that part is transcribed while they go on, and only what follows waits for the end.
# Shorter parts stay whole: the engines hear words better in context (cut after 2 s, a sentence
# with a hesitation in it came back garbled, and the end-of-turn judge waited it out).
SPLIT_SILENCE_FRAMES = 250 // FRAME_MS
MIN_PART_FRAMES = 4000 // FRAME_MS
# Speech that runs on this long without such a pause is cut at its quietest 60 ms in the last
# second, so that no part grows without bound.
MAX_PART_FRAMES = 6000 // FRAME_MS
QUIET_WINDOW_FRAMES = 3


class TranscriptionEngine(Protocol):
    """An ASR model shared by every session, transcribing whole utterances in its worker."""

    worker: ModelWorker

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        """16 kHz int16 or float PCM to text; a `draft` may trade accuracy for speed."""
        ...


@dataclass
class Part:
    """A stretch of the utterance, frames [start, end); `text` once transcribed."""

    start: int
    end: int
    text: str | None = None


class StreamingTranscriber:
    """One session's streaming transcription; owns its one background transcription at a time.

    The utterance is kept as parts: the closed ones, cut at the user's pauses (each transcribed
    once, in the background, and kept), and the open one since the last cut. While the user speaks,
    each `partial_ms` of new audio starts a quick draft of the open part (only when the worker is
    idle: partials never delay anyone's final); `settle_ms` into a silence the open part is
    transcribed eagerly. finalize() waits for what covers the last voiced frame and joins the
    parts' texts, so the final transcript is usually ready before the endpointer even asks, and
    at the end of a long turn only its last part is left to transcribe. The closed parts' texts,
    once each is known, are the transcript's stable start (`on_stable`).
    """

    def __init__(self, engine: TranscriptionEngine, partial_ms: int = 500, settle_ms: int = 60) -> None:
        self._engine = engine
        self._partial_frames = max(1, partial_ms // FRAME_MS)
        self._settle_frames = max(1, settle_ms // FRAME_MS)
        self._frames: list[np.ndarray] = []
        self._voiced_end = 0  # frames up to and including the last voiced one
        self._started_at = 0  # frame count the newest transcription started from
        self._parts: list[Part] = []  # the closed parts
        self._open = 0  # where the open part starts
        self._tasks = TaskOwner("asr")
        self._job: asyncio.Task[None] | None = None
        self._job_covers = 0  # the open part's job (not a draft): the voiced end it covers
        self._result: tuple[int, int, str] | None = None  # the open part's (start, voiced end covered, text)
        self._utterance = 0
        self._on_partial: PartialCallback | None = None
        self._on_stable: StableCallback | None = None
        self._stable_parts = 0  # closed parts whose text went to on_stable
        self._finalized = False  # no partial may follow a final until more audio comes
        self._closed = False

    def begin(
        self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None, on_stable: StableCallback | None = None
    ) -> None:
        self._utterance += 1  # a transcription still running for the last utterance is ignored
        self._frames = list(frames)
        self._voiced_end = len(self._frames)
        self._started_at = 0
        self._parts, self._open = [], 0
        self._result = None
        self._on_partial = on_partial
        self._on_stable = on_stable
        self._stable_parts = 0
        self._finalized = False

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self._frames.append(frame)
        self._finalized = False
        if voiced:
            self._voiced_end = len(self._frames)
        self._cut_if_due()
        if self._closed or (self._job is not None and not self._job.done()):
            return
        pending = next((part for part in self._parts if part.text is None), None)
        silent_run = len(self._frames) - self._voiced_end
        if pending is not None:
            self._start_part(pending)
        elif silent_run >= self._settle_frames and self._voiced_end > self._open and not self._covered():
            self._start_open(draft=False)
        elif voiced and len(self._frames) - self._started_at >= self._partial_frames and self._engine.worker.busy == 0:
            self._start_open(draft=True)

    def _cut_if_due(self) -> None:
        """Close the open part at a pause of the user's, or at its quietest moment if it runs long."""
        speech = self._voiced_end - self._open
        if len(self._frames) - self._voiced_end >= SPLIT_SILENCE_FRAMES and speech >= MIN_PART_FRAMES:
            self._close_at(self._voiced_end + TAIL_FRAMES)
        elif speech >= MAX_PART_FRAMES and len(self._frames) == self._voiced_end:
            self._close_at(self._quietest(self._voiced_end - 1000 // FRAME_MS, self._voiced_end))

    def _quietest(self, start: int, end: int) -> int:
        """The middle of the quietest QUIET_WINDOW_FRAMES in frames [start, end)."""
        energy = np.array([float(np.mean(np.square(f, dtype=np.float64))) for f in self._frames[start:end]])
        windows = np.convolve(energy, np.ones(QUIET_WINDOW_FRAMES), mode="valid")
        return start + int(np.argmin(windows)) + QUIET_WINDOW_FRAMES // 2

    def _close_at(self, cut: int) -> None:
        result = self._result
        # The open part's eager transcription covered exactly this stretch: it is the part's text.
        text = result[2] if result is not None and result[0] == self._open and result[1] == self._voiced_end and cut == self._voiced_end + TAIL_FRAMES else None
        self._parts.append(Part(self._open, cut, text))
        self._open, self._result, self._started_at = cut, None, cut
        self._report_stable()

    def _covered(self) -> bool:
        return self._result is not None and self._result[0] == self._open and self._result[1] >= self._voiced_end

    def _start_part(self, part: Part) -> None:
        audio = np.concatenate(self._frames[part.start : part.end])
        self._job = self._tasks.spawn(self._transcribe_part(part, audio, self._utterance), "transcribe")

    def _start_open(self, draft: bool) -> None:
        self._started_at = len(self._frames)
        self._job_covers = 0 if draft else self._voiced_end  # a draft is never the final
        job = self._transcribe_open(self._open_audio(), self._open, self._voiced_end, self._utterance, draft)
        self._job = self._tasks.spawn(job, "transcribe")

    def _open_audio(self) -> np.ndarray:
        """The open part, without the silence after its last voiced frame."""
        return np.concatenate(self._frames[self._open : self._voiced_end + TAIL_FRAMES])

    async def _transcribe_part(self, part: Part, audio: np.ndarray, utterance: int) -> None:
        try:
            text = await self._engine.transcribe(audio)
        except Exception as exc:  # finalize transcribes it again
            log.warning("asr.partial_failed", error=repr(exc))
            return
        if utterance == self._utterance:
            part.text = text
            self._report_stable()

    async def _transcribe_open(self, audio: np.ndarray, start: int, covers: int, utterance: int, draft: bool) -> None:
        try:
            text = await self._engine.transcribe(audio, draft)
        except Exception as exc:  # a lost partial is not worth a session: finalize transcribes again
            log.warning("asr.partial_failed", error=repr(exc))
            return
        if utterance != self._utterance:
            return
        if not draft:
            closed = next((p for p in self._parts if p.start == start and p.text is None and p.end == covers + TAIL_FRAMES), None)
            if closed is not None:  # the open part was closed meanwhile, just as transcribed
                closed.text = text
                self._report_stable()
            elif start == self._open:
                self._result = (start, covers, text)
        if self._on_partial is not None and text and not self._finalized:
            self._on_partial(UtteranceInput(self._joined(text)))

    def _report_stable(self) -> None:
        """The closed parts' texts, up to the first not yet known, if that reaches a part further
        than last time (and no final has been asked for: its reply reads the whole turn)."""
        known = 0
        while known < len(self._parts) and self._parts[known].text is not None:
            known += 1
        if known <= self._stable_parts or self._on_stable is None or self._finalized:
            return
        self._stable_parts = known
        text = " ".join(t for t in (p.text for p in self._parts[:known]) if t)
        if text:
            self._on_stable(text)

    def _joined(self, open_text: str) -> str:
        return " ".join(t for t in (*(p.text for p in self._parts), open_text) if t)

    async def finalize(self) -> UtteranceInput:
        self._finalized = True
        for part in self._parts:
            while part.text is None:
                job = self._job
                if job is not None and not job.done():
                    # Shielded: a cancelled speculation must not kill work the next finalize can reuse.
                    await asyncio.shield(job)
                else:
                    part.text = await self._engine.transcribe(np.concatenate(self._frames[part.start : part.end]))
        job = self._job
        if job is not None and not job.done() and self._job_covers >= self._voiced_end > self._open:
            await asyncio.shield(job)
        if self._voiced_end <= self._open:  # nothing said since the last cut
            open_text = ""
        elif self._covered():
            assert self._result is not None
            open_text = self._result[2]
        else:
            covers = self._voiced_end
            open_text = await self._engine.transcribe(self._open_audio())
            self._result = (self._open, covers, open_text)
        return UtteranceInput(self._joined(open_text))

    async def aclose(self) -> None:
        self._closed = True
        await self._tasks.aclose()
