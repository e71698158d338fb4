"""Speech detectors: a speech probability for each 20 ms frame of 16 kHz mono int16 audio."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Protocol

import numpy as np
import onnxruntime
import webrtcvad

from runtime.audio import SAMPLE_RATE, to_float


class SpeechDetector(Protocol):
    """One stream's detector; holds that stream's state (so one per session)."""

    def probability(self, frame: np.ndarray) -> float:
        """Speech probability of one 20 ms frame (320 int16 samples)."""

    def reset(self) -> None: ...


class WebRtcDetector:
    """webrtcvad's GMM detector: 0 or 1 per frame; aggressiveness 0 (lenient) to 3 (strict)."""

    def __init__(self, aggressiveness: int = 2) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)

    def probability(self, frame: np.ndarray) -> float:
        return 1.0 if self._vad.is_speech(frame.astype("<i2").tobytes(), SAMPLE_RATE) else 0.0

    def reset(self) -> None:
        pass


@functools.cache
def _silero_session() -> onnxruntime.InferenceSession:
    # One model for all sessions: run() is thread-safe and the recurrent state is passed in and out.
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    path = resources.files("silero_vad") / "data" / "silero_vad.onnx"
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class SileroDetector:
    """Silero VAD (the ONNX model shipped in the silero-vad package) over 512-sample windows.

    The recurrent state and the 64-sample context carry across consecutive windows. A 20 ms frame
    that does not end on a window's end is also scored on the 512 samples ending with it, from the
    state as it stands (which that score does not change): its probability is then up to date
    instead of up to 28 ms old, which is what a barge-in waits on.
    """

    WINDOW = 512
    CONTEXT = 64

    def __init__(self) -> None:
        self._session = _silero_session()
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self.CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._recent = np.zeros(self.CONTEXT + self.WINDOW, dtype=np.float32)

    def _run(self, model_input: np.ndarray) -> tuple[float, np.ndarray]:
        out, state = self._session.run(
            None, {"input": model_input[None, :], "state": self._state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)}
        )
        return float(out[0, 0]), state

    def probability(self, frame: np.ndarray) -> float:
        samples = to_float(frame)
        self._recent = np.concatenate((self._recent, samples))[-(self.CONTEXT + self.WINDOW) :]
        self._pending = np.concatenate((self._pending, samples))
        probability = None
        while len(self._pending) >= self.WINDOW:
            window, self._pending = self._pending[: self.WINDOW], self._pending[self.WINDOW :]
            probability, self._state = self._run(np.concatenate((self._context, window)))
            self._context = window[-self.CONTEXT :]
        if len(self._pending) or probability is None:
            probability, _ = self._run(self._recent)
        return probability


def make_detector(engine: str, aggressiveness: int = 2) -> SpeechDetector:
    if engine == "silero":
        return SileroDetector()
    if engine == "webrtc":
        return WebRtcDetector(aggressiveness)
    raise ValueError(f"unknown VAD engine {engine!r}")
