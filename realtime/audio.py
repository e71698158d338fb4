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


class WindowedUpsampler:
    """A rate that divides 16 kHz (a phone's 8 kHz) up to 16 kHz at soxr's high quality, handing each
    chunk on `LOOKAHEAD` input samples later. soxr's own high-quality stream hands upsampled output
    on in blocks of ~100 ms, so frames would reach the speech detector that late, in bursts; here
    each chunk is resampled in a window with the history and the look-ahead the filter reaches,
    and only its middle is kept: equal to the whole signal's resampling (to 1e-7 with these
    lengths), as the streaming one is."""

    LOOKAHEAD = 128  # input samples after the last one handed on (16 ms at 8 kHz)
    HISTORY = 4 * LOOKAHEAD

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._factor = SAMPLE_RATE // rate
        self._buffer = np.zeros(self.HISTORY, dtype=np.float32)  # silence before the first sample
        self._done = self.HISTORY  # where in the buffer the output so far ends

    def resample_chunk(self, chunk: np.ndarray) -> np.ndarray:
        self._buffer = np.concatenate((self._buffer, chunk))
        end = len(self._buffer) - self.LOOKAHEAD
        if end <= self._done:
            return np.zeros(0, dtype=np.float32)
        start = self._done - self.HISTORY
        window = soxr.resample(self._buffer[start:], self.rate, SAMPLE_RATE, quality="HQ")
        out = window[(self._done - start) * self._factor : (end - start) * self._factor]
        self._buffer, self._done = self._buffer[end - self.HISTORY :], self.HISTORY
        return out


def resampler(sample_rate: int) -> soxr.ResampleStream | WindowedUpsampler | None:
    """A live stream from `sample_rate` to 16 kHz: none at 16 kHz; windowed for a rate that divides
    it; soxr's stream otherwise (downsampling: it hands each chunk on within a frame; 11025 and
    12000 Hz, rare /ws rates, at its quick quality, which hands chunks on at once)."""
    if sample_rate == SAMPLE_RATE:
        return None
    if SAMPLE_RATE % sample_rate == 0:
        return WindowedUpsampler(sample_rate)
    return soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="QQ" if sample_rate < SAMPLE_RATE else "HQ")


class InputFramer:
    """Turns mono float chunks at any rate into 20 ms frames of 16 kHz mono int16."""

    def __init__(self) -> None:
        self._rate: int | None = None
        self._resampler: soxr.ResampleStream | WindowedUpsampler | None = None
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, mono: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        if sample_rate != self._rate:
            self._rate = sample_rate
            self._resampler = resampler(sample_rate)
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        resampled = mono if self._resampler is None else self._resampler.resample_chunk(mono)
        self._pending = np.concatenate((self._pending, resampled))
        count = len(self._pending) // FRAME_SAMPLES
        frames = [
            float_to_int16(self._pending[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(count)
        ]
        self._pending = self._pending[count * FRAME_SAMPLES :]
        return frames
