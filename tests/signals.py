"""Test signals and the measures used to compare what was sent with what came back."""

from __future__ import annotations

import numpy as np
import soxr


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-rate-modulated harmonic signal that survives Opus and has one clear alignment."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 0.6
    noise = rng.standard_normal(len(t)) * 0.05
    return (0.25 * voice * syllables + noise * syllables).astype(np.float32)


def best_alignment(reference: np.ndarray, received: np.ndarray) -> tuple[float, int]:
    """(peak normalized cross-correlation, lag in samples of `reference` inside `received`)."""
    n = len(received) + len(reference)
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(received, size) * np.conj(np.fft.rfft(reference, size)), size)
    corr = corr[: len(received) - len(reference) + 1]
    # Energy of each window of `received` the reference could align with.
    cumulative = np.concatenate(([0.0], np.cumsum(received.astype(np.float64) ** 2)))
    window_energy = cumulative[len(reference) :] - cumulative[: -len(reference)]
    norm = np.sqrt(np.maximum(window_energy, 1e-12) * float(np.sum(reference.astype(np.float64) ** 2)))
    scores = corr / norm
    lag = int(np.argmax(scores))
    return float(scores[lag]), lag


def resample(pcm: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    return soxr.resample(pcm.astype(np.float32), rate_in, rate_out)


def envelope(pcm: np.ndarray, rate: int, hop_ms: int = 5) -> np.ndarray:
    """RMS loudness per hop, mean removed: survives codecs that change the waveform's phase."""
    hop = rate * hop_ms // 1000
    frames = pcm[: len(pcm) // hop * hop].astype(np.float64).reshape(-1, hop)
    env = np.sqrt(np.mean(frames**2, axis=1))
    return env - env.mean()


def envelope_alignment(reference: np.ndarray, received: np.ndarray, rate: int, hop_ms: int = 5) -> tuple[float, float]:
    """(peak correlation of the loudness envelopes, lag in ms of `reference` inside `received`)."""
    score, lag = best_alignment(envelope(reference, rate, hop_ms), envelope(received, rate, hop_ms))
    return score, lag * hop_ms
