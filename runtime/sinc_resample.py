"""Band-limited resampling by a Hann-windowed sinc (6 zero crossings, cut-off at 0.99 of the lower
Nyquist frequency), the method torchaudio's `Resample` uses: where a reference pipeline resamples
with torchaudio, this gives its samples without torchaudio (which has no build for this
project's torch). Each output phase has its own filter, applied at a stride of the input's
reduced rate; float64 filters stored as float32, the signal filtered in float32, as there."""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ZERO_CROSSINGS = 6
ROLLOFF = 0.99


@functools.lru_cache(maxsize=16)
def sinc_filters(orig: int, new: int) -> tuple[np.ndarray, int]:
    """The filters for reduced rates `orig` -> `new` (coprime), one row per output phase
    (new, 2 * width + orig), and `width`, the input samples each reaches on either side."""
    cutoff = min(orig, new) * ROLLOFF  # in cycles per reduced input-rate unit
    width = math.ceil(ZERO_CROSSINGS * orig / cutoff)
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig
    # Phase j's delay, -j/new: computed in float32 where torchaudio divides integers.
    delays = (np.arange(0, -new, -1) / new).astype(np.float32).astype(np.float64)
    t = np.clip((delays[:, None] + taps[None, :]) * cutoff, -ZERO_CROSSINGS, ZERO_CROSSINGS)
    window = np.cos(t * math.pi / ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    with np.errstate(divide="ignore", invalid="ignore"):
        sinc = np.where(t == 0, 1.0, np.sin(t) / t)
    return (sinc * (window * (cutoff / orig))).astype(np.float32), width


def resample(audio: np.ndarray, rate: int, to_rate: int) -> np.ndarray:
    """Mono float audio at `rate` as float32 at `to_rate`: ceil(len * to_rate / rate) samples."""
    audio = np.asarray(audio, dtype=np.float32)
    if rate == to_rate:
        return audio.copy()
    common = math.gcd(rate, to_rate)
    orig, new = rate // common, to_rate // common
    filters, width = sinc_filters(orig, new)
    padded = np.pad(audio, (width, width + orig))
    frames = sliding_window_view(padded, filters.shape[1])[::orig]
    out = (frames @ filters.T).reshape(-1)
    return out[: math.ceil(new * len(audio) / orig)]
