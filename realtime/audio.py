"""Audio framing: anything the transports receive becomes fixed 20 ms frames of 16 kHz mono int16.

One resampler stream per input keeps its filter state across packets, so no sample is lost or
duplicated at packet or frame boundaries and the output count never drifts from the input.
"""

from __future__ import annotations

import numpy as np
import soxr
from av import AudioFrame

from runtime.audio import FRAME_SAMPLES, SAMPLE_RATE, float_to_int16


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


def quality(sample_rate: int) -> str:
    """soxr's quality for a live stream from `sample_rate` to 16 kHz. Upsampling (a phone's 8 kHz),
    its high-quality stream hands its output on in blocks of ~100 ms: frames would reach the speech
    detector that late, in bursts. The quick one hands each chunk on at once, and only interpolates
    what the narrower band never had. Downsampling (48 kHz) keeps the high quality: it hands each
    chunk on within a frame."""
    return "QQ" if sample_rate < SAMPLE_RATE else "HQ"


class InputFramer:
    """Turns mono float chunks at any rate into 20 ms frames of 16 kHz mono int16."""

    def __init__(self) -> None:
        self._rate: int | None = None
        self._resampler: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, mono: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        if sample_rate != self._rate:
            self._rate = sample_rate
            self._resampler = (
                None if sample_rate == SAMPLE_RATE else soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=quality(sample_rate))
            )
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        resampled = mono if self._resampler is None else self._resampler.resample_chunk(mono)
        self._pending = np.concatenate((self._pending, resampled))
        count = len(self._pending) // FRAME_SAMPLES
        frames = [
            float_to_int16(self._pending[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(count)
        ]
        self._pending = self._pending[count * FRAME_SAMPLES :]
        return frames
