"""Smart Turn v3.2: the probability that a user's turn is complete, from how its audio ends."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.audio import SAMPLE_RATE, to_float
from runtime.workers import ModelWorker

WINDOW_S = 8  # the model reads the last 8 s, left-padded with silence


class SmartTurn:
    """Owns Smart Turn v3.2 (the CPU ONNX model inside pipecat-ai's wheel, BSD-2-Clause), shared by
    every session; scoring runs in its worker thread (24-45 ms a call on this machine's cores).

    Input: the Whisper-style 80-bin log-mel of the waveform normalised to zero mean and unit
    variance; output: the probability that the speaker has finished their turn. Trained on human
    speech: on synthetic voices it leans on falling intonation, so the turn judge weighs a text
    check on the transcript above it.
    """

    def __init__(self, model: Path, worker: ModelWorker, threads: int = 1) -> None:
        import onnxruntime
        from faster_whisper.feature_extractor import FeatureExtractor

        self.worker = worker
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._features = FeatureExtractor(feature_size=80, chunk_length=WINDOW_S)

    def score_now(self, pcm: np.ndarray) -> float:
        """Blocking: 16 kHz int16 or float PCM of the utterance so far -> P(turn complete)."""
        window = WINDOW_S * SAMPLE_RATE
        audio = to_float(pcm)[-window:]
        audio = np.pad(audio, (window - len(audio), 0))
        audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
        features = self._features(audio.astype(np.float32), padding=0)
        (probability,) = self._session.run(None, {"input_features": features[None].astype(np.float32)})
        return float(np.asarray(probability).reshape(-1)[0])

    async def score(self, pcm: np.ndarray) -> float:
        return await self.worker.run(self.score_now, pcm)
