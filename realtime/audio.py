"""Audio framing: anything the transports receive becomes fixed 20 ms frames of 16 kHz mono int16.

One resampler stream per input keeps its filter state across packets, so no sample is lost or
duplicated at packet or frame boundaries and the output count never drifts from the input.
"""

from __future__ import annotations

import numpy as np
import soxr
from av import AudioFrame

INPUT_RATE = 16000
FRAME_MS = 20
INPUT_FRAME_SAMPLES = INPUT_RATE * FRAME_MS // 1000


def frame_to_mono(frame: AudioFrame) -> np.ndarray:
    """Downmix an av frame (packed or planar, any channel count) to mono float32 in [-1, 1]."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        mono = data.astype(np.float32).mean(axis=0)
    else:
        mono = data.reshape(-1, channels).astype(np.float32).mean(axis=1)
    if data.dtype == np.int16:
        mono /= 32768.0
    elif data.dtype == np.int32:
        mono /= 2147483648.0
    return mono


def to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM scaled to [-1, 1), or float PCM as float32."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    return pcm.astype(np.float32, copy=False)


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)


class InputFramer:
    """Turns mono float chunks at any rate into 20 ms frames of 16 kHz mono int16."""

    def __init__(self) -> None:
        self._rate: int | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, dtype=np.float32)
        self.samples_in = 0
        self.frames_out = 0

    def push(self, mono: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        if sample_rate != self._rate:
            self._rate = sample_rate
            self._resampler = (
                None if sample_rate == INPUT_RATE else soxr.ResampleStream(sample_rate, INPUT_RATE, 1, dtype="float32")
            )
        self.samples_in += len(mono)
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        resampled = mono if self._resampler is None else self._resampler.resample_chunk(mono)
        self._pending = np.concatenate((self._pending, resampled))
        count = len(self._pending) // INPUT_FRAME_SAMPLES
        frames = [
            float_to_int16(self._pending[i * INPUT_FRAME_SAMPLES : (i + 1) * INPUT_FRAME_SAMPLES]) for i in range(count)
        ]
        self._pending = self._pending[count * INPUT_FRAME_SAMPLES :]
        self.frames_out += count
        return frames
