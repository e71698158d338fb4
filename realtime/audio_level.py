"""The audio level each outgoing RTP packet carries (RFC 6465), computed with numpy.

aiortc computes it in a Python loop over every sample of every frame it sends: about 125 us a
20 ms frame here, on the event loop, for each call. The same sum over the same bytes in numpy
takes about 6 us and gives the same level."""

from __future__ import annotations

import math

import numpy as np
from aiortc import rtp
from av import AudioFrame

MAX_SAMPLE = 32767
MIN_LEVEL = -127  # dBov: silence


def audio_level_dbov(frame: AudioFrame) -> int:
    """The level of an s16 frame in dBov (0 loudest, -127 silent), as RFC 6465's Appendix A and
    aiortc define it: the RMS over every sample of the first plane."""
    samples = np.frombuffer(bytes(frame.planes[0]), dtype=np.int16).astype(np.float64)
    rms = math.sqrt(float(np.dot(samples, samples)) / (frame.samples * MAX_SAMPLE * MAX_SAMPLE))
    if rms <= 0:
        return MIN_LEVEL
    return round(min(0.0, max(float(MIN_LEVEL), 20 * math.log10(rms))))


def install() -> None:
    """aiortc's sender asks `aiortc.rtp` for the level of each frame: answer with this one."""
    rtp.compute_audio_level_dbov = audio_level_dbov  # type: ignore[assignment]
