"""The audio format inside the server: 20 ms frames of 16 kHz mono int16, and the conversions."""

from __future__ import annotations

import math

import numpy as np

SAMPLE_RATE = 16000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
AUDIBLE = 100.0**2  # the power (int16 units) of a frame at -50 dBFS: quieter is silence


def to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM scaled to [-1, 1), or float PCM as float32."""
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    return pcm.astype(np.float32, copy=False)


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype(np.int16)


def power(pcm: np.ndarray) -> float:
    """The mean square of the samples, in their own units."""
    return float(np.mean(np.square(pcm, dtype=np.float64)))


def level_db(frame: np.ndarray) -> float:
    """A frame's power in dB of int16 units (digital silence: 0 dB, full scale: 90 dB)."""
    return 10 * math.log10(power(frame) + 1.0)
