"""Streaming transcription with faster-whisper: partial transcripts while the user speaks, a final
one at the pause that reuses the last partial when it already covers every voiced frame."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import structlog

from runtime.audio import FRAME_MS, SAMPLE_RATE, to_float
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.base import PartialCallback, UtteranceInput

log = structlog.get_logger()

DRAFT_MAX_FRAMES = 3000  # Whisper's whole window: 30 s of 10 ms feature frames
DRAFT_MAX_SAMPLES = 28 * SAMPLE_RATE


class WhisperEngine:
    """Owns the Whisper model that every session shares, and the worker thread it runs in."""

    def __init__(self, model_dir: Path, threads: int, worker: ModelWorker) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.worker = worker
        self._model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=threads)
        tokenizer = Tokenizer(self._model.hf_tokenizer, self._model.model.is_multilingual, "transcribe", "en")
        self._tokenizer = tokenizer
        self._draft_prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]

    def transcribe_now(self, pcm: np.ndarray, draft: bool = False) -> str:
        """Blocking: 16 kHz int16 or float PCM to text. Call it from a worker thread.

        A draft encodes only the audio (plus a second of silence) instead of Whisper's 30 s window:
        about four times faster on short utterances and less accurate, which suits partials.
        """
        audio = to_float(pcm)
        if draft and len(audio) < DRAFT_MAX_SAMPLES:
            return self._draft(audio)
        segments, _ = self._model.transcribe(
            audio,
            language="en",
            beam_size=1,
            without_timestamps=True,
            condition_on_previous_text=False,
            temperature=0.0,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

    def _draft(self, audio: np.ndarray) -> str:
        import ctranslate2

        padded = np.concatenate([audio, np.zeros(SAMPLE_RATE, dtype=np.float32)])
        features = self._model.feature_extractor(padded)[:, :DRAFT_MAX_FRAMES]
        seconds = len(audio) / SAMPLE_RATE
        result = self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])),
            [self._draft_prompt],
            beam_size=1,
            max_length=int(8 + 6 * seconds),  # a bound on tokens: short context can loop
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        eot = self._tokenizer.eot
        return self._tokenizer.decode([t for t in result[0].sequences_ids[0] if t < eot]).strip()

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        return await self.worker.run(self.transcribe_now, pcm, draft)


class WhisperTokenizer:
    """One session's streaming transcription; owns its one background transcription at a time.

    Whisper is not incremental, so the work it can reuse is a whole transcript: while the user
    speaks, each `partial_ms` of new audio starts a quick draft of the utterance so far (only when
    the worker is idle: partials never delay anyone's final); `settle_ms` into a silence, a full
    transcription starts eagerly. finalize() waits for that one when it covers the last voiced
    frame, so the transcript is usually ready before the endpointer even asks.
    """

    def __init__(self, engine: WhisperEngine, partial_ms: int = 500, settle_ms: int = 100) -> None:
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

    def _start(self, draft: bool) -> None:
        self._started_at = len(self._frames)
        self._job_covers = 0 if draft else len(self._frames)  # a draft is never the final
        audio = np.concatenate(self._frames)
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
        text = await self._engine.transcribe(np.concatenate(self._frames)) if self._frames else ""
        self._result = (covers, text)
        return UtteranceInput(text)

    async def aclose(self) -> None:
        self._closed = True
        await self._tasks.aclose()
