"""Moonshine tiny-en (its weights ship inside `moonshine-voice` 0.0.73), the ASR engine of
`--asr moonshine`: it encodes only the utterance, where Whisper always encodes a 30 s window."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runtime.audio import SAMPLE_RATE, to_float
from runtime.workers import ModelWorker


class MoonshineEngine:
    """Owns the Moonshine transcriber that every session shares; calls run one at a time in its
    worker thread."""

    def __init__(self, model_dir: Path, worker: ModelWorker) -> None:
        # One ONNX Runtime thread per model: on two cores more threads only slow the event loop,
        # and a single thread measured as fast for utterances of a few seconds.
        os.environ.setdefault("MOONSHINE_ORT_SINGLE_THREAD", "1")
        from moonshine_voice import ModelArch
        from moonshine_voice.transcriber import Transcriber

        self.worker = worker
        # vad_threshold 0: one utterance is one segment. Moonshine's own segmenter otherwise cuts a
        # fraction of a second of near-silence off the start and hears a word in it ("You").
        self._transcriber = Transcriber(str(model_dir), ModelArch.TINY, options={"vad_threshold": "0"})

    def transcribe_now(self, pcm: np.ndarray, draft: bool = False) -> str:
        """Blocking: 16 kHz int16 or float PCM to text (no draft mode: a draft is the same work).
        Call it from a worker thread."""
        audio = to_float(pcm)
        if not len(audio):
            return ""
        transcript = self._transcriber.transcribe_without_streaming(audio.tolist(), SAMPLE_RATE)
        return " ".join(line.text.strip() for line in transcript.lines if line.text.strip())

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        return await self.worker.run(self.transcribe_now, pcm, draft)

    def close(self) -> None:
        self._transcriber.close()
