"""Test signals and the measures used to compare what was sent with what came back."""

from __future__ import annotations

import numpy as np
import soxr


def speechlike(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced harmonic signal cut into syllables of random length, loudness and spacing: it survives
    Opus, and its loudness envelope has one clear alignment (a different seed does not match it)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.zeros(n)
    start = int(rng.uniform(0.0, 0.05) * rate)
    while start < n:
        length = int(rng.uniform(0.08, 0.26) * rate)
        shape = np.hanning(length) ** 0.6 * rng.uniform(0.3, 1.0)
        syllables[start : start + length] = shape[: n - start]
        start += length + int(rng.uniform(0.03, 0.15) * rate)
    noise = rng.standard_normal(n) * 0.05
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


def loudness(pcm: np.ndarray, rate: int, hop_ms: int = 5) -> np.ndarray:
    """RMS loudness per hop: survives codecs that change the waveform's phase."""
    hop = rate * hop_ms // 1000
    frames = pcm[: len(pcm) // hop * hop].astype(np.float64).reshape(-1, hop)
    return np.sqrt(np.mean(frames**2, axis=1))


def envelope(pcm: np.ndarray, rate: int, hop_ms: int = 5) -> np.ndarray:
    """Loudness with its mean removed."""
    env = loudness(pcm, rate, hop_ms)
    return env - env.mean()


def envelope_alignment(reference: np.ndarray, received: np.ndarray, rate: int, hop_ms: int = 5) -> tuple[float, float]:
    """(peak correlation of the loudness envelopes, lag in ms of `reference` inside `received`)."""
    score, lag = best_alignment(envelope(reference, rate, hop_ms), envelope(received, rate, hop_ms))
    return score, lag * hop_ms


def segment_alignments(
    reference: np.ndarray, received: np.ndarray, rate: int, segment_ms: int, search_ms: tuple[float, float], hop_ms: int = 5
) -> list[tuple[float, float]]:
    """(envelope correlation, lag in ms) of each `segment_ms` piece of `reference`, each searched for in
    `received` at lags inside `search_ms`. Unlike one global alignment this survives a short gap
    (a late packet) inside the received copy: only the piece that holds the gap scores low."""
    ref_env, rec_env = loudness(reference, rate, hop_ms), loudness(received, rate, hop_ms)
    per_segment = segment_ms // hop_ms
    first, last = (int(ms // hop_ms) for ms in search_ms)
    results = []
    for begin in range(0, len(ref_env) - per_segment + 1, per_segment):
        piece = ref_env[begin : begin + per_segment] - ref_env[begin : begin + per_segment].mean()
        best = (-1.0, 0.0)
        for lag in range(max(0, begin + first), min(len(rec_env) - per_segment, begin + last) + 1):
            window = rec_env[lag : lag + per_segment] - rec_env[lag : lag + per_segment].mean()
            norm = np.sqrt(np.sum(window**2) * np.sum(piece**2))
            score = float(np.dot(window, piece) / norm) if norm > 1e-12 else 0.0
            if score > best[0]:
                best = (score, (lag - begin) * hop_ms)
        results.append(best)
    return results
