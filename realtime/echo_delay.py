"""How long a call's echo takes to come back: found first from the waveforms of what was sent and
what the microphone heard (within a second of the echo), then followed from their levels, so the
cancellers are handed their reference that much later and work on the rest."""

from __future__ import annotations

import collections
import math

import numpy as np

from runtime.audio import AUDIBLE, level_db

WINDOW_FRAMES = 250  # the last 5 s of both, compared
FIRST_FRAMES = 100  # from 2 s of the agent audible on (from 0.8 s the delay found was a frame late, and wrong once)
MAX_FRAMES = 60  # lags looked at: up to 1.2 s (the client's buffer, the network both ways, the room)
EVERY_FRAMES = 50  # looked for again each second
SEEKING_FRAMES = 10  # and each 200 ms until first found
MATCH = 0.5  # correlation of the two levels (dB, frame by frame) that counts as the echo found
VARIED_DB = 6.0  # and only over sent audio that varies this much (speech, not silence or a tone)
AUDIBLE_DB = 10 * math.log10(AUDIBLE)  # a frame sent under it is silence
CLEARER = 0.2  # a new lag only once the one in use no longer matches, and this much better (live, the user
# answering ~1.2 s after each reply ends matched at 1.2 s in windows of mostly their own speech)
WAVE_FRAMES = 100  # the first delay: from the waveforms of the last 2 s at most
WAVE_FIRST = 25  # from 0.5 s of the agent audible on
WAVE_PEAK = 0.05  # whitened cross-correlation at the lag found, as a share of a perfect match
WAVE_CLEAR = 8.0  # and that many standard deviations over the correlation at the other lags
# (noise and a user's voice alone, measured: peaks under 0.045, or under 7.6 deviations from 0.5 s on)
MOVED_FRAMES = 3  # a delay found within 60 ms of the one in use changes nothing: the canceller re-learns at each change


def waveform_lag(heard: np.ndarray, sent: np.ndarray, most: int) -> tuple[int, float, float]:
    """The lag (samples, 0 to `most`) at which `heard` best matches `sent` (which holds `most`
    samples more, before it, ending at the same time), by the phase-transform cross-correlation
    (each frequency weighted alike, so the loud low vowels do not blur the peak): (lag, its peak as
    a share of a perfect match, that peak in standard deviations of the other lags)."""
    size = 1 << int(np.ceil(np.log2(len(sent) + len(heard))))
    cross = np.fft.rfft(heard, size) * np.conj(np.fft.rfft(sent, size))
    cross /= np.abs(cross) + 1e-9 * float(np.abs(cross).max()) + 1e-30
    correlation = np.fft.irfft(cross, size)
    lags = np.arange(most + 1)
    values = correlation[(lags - most) % size]
    lag = int(np.argmax(values))
    return lag, float(values[lag]), float(values[lag] / (np.std(values) + 1e-12))


class EchoDelay:
    """Owns the estimate of the echo's delay in frames (None until found): the level of each frame
    sent and each frame heard, in order (both streams run at one frame each 20 ms, so the n-th
    heard frame holds the echo of the sent frame `delay` before it), and the lag at which the
    two match best, while they match clearly. Until first found, the frames themselves too: their
    waveforms place the echo from half a second of it, where the levels need two."""

    def __init__(self) -> None:
        self._sent: collections.deque[float] = collections.deque(maxlen=WINDOW_FRAMES + MAX_FRAMES)
        self._heard: collections.deque[float] = collections.deque(maxlen=WINDOW_FRAMES)
        self._sent_wave: collections.deque[np.ndarray] = collections.deque(maxlen=WAVE_FRAMES + MAX_FRAMES)
        self._heard_wave: collections.deque[np.ndarray] = collections.deque(maxlen=WAVE_FRAMES)
        self._since = 0
        self._audible = 0  # frames sent since the first audible one: before it, nothing can come back
        self.frames: int | None = None
        self.score = 0.0  # how well the levels matched at that delay
        self._candidate: int | None = None

    def sent(self, frame: np.ndarray) -> None:
        """A frame sent (16 kHz samples, one each 20 ms)."""
        level = level_db(frame)
        self._sent.append(level)
        if self.frames is None:
            self._sent_wave.append(np.asarray(frame, dtype=np.float32))
        if self._audible or level > AUDIBLE_DB:
            self._audible += 1

    def _window(self) -> int:
        return min(len(self._heard), len(self._sent) - MAX_FRAMES, self._audible)

    def heard(self, frame: np.ndarray) -> None:
        """A frame heard (16 kHz samples), as the microphone's frames come in."""
        self._heard.append(level_db(frame))
        self._since += 1
        if self.frames is None:
            self._heard_wave.append(np.asarray(frame, dtype=np.float32))
            if self._since >= SEEKING_FRAMES and self._window() >= WAVE_FIRST:
                self._since = 0
                self._find_waveform()
                if self.frames is None and self._window() >= FIRST_FRAMES:
                    self._find()
        elif self._since >= EVERY_FRAMES:
            self._since = 0
            self._find()

    def _find_waveform(self) -> None:
        frames = min(self._window(), len(self._heard_wave))
        heard = np.concatenate(list(self._heard_wave)[-frames:])
        size = len(self._heard_wave[-1])
        sent = np.concatenate(list(self._sent_wave)[-frames - MAX_FRAMES :])
        lag, peak, clear = waveform_lag(heard, sent, MAX_FRAMES * size)
        best = lag // size
        # Its levels must match there too: a user's voice alone can resemble the agent's in its fine structure.
        scores = self._level_scores(frames)
        if peak < WAVE_PEAK or clear < WAVE_CLEAR or scores is None or max(scores[max(0, best - 1) : best + 2]) < MATCH:
            self._candidate = None
            return
        if self._candidate is None or abs(best - self._candidate) > 1:
            self._candidate = best  # taken once found twice in a row (200 ms apart)
            return
        self.frames, self.score, self._candidate = best, peak, None
        self._sent_wave.clear()
        self._heard_wave.clear()

    def _level_scores(self, frames: int) -> list[float] | None:
        """How well the levels of the last `frames` heard match those sent, at each lag (None
        where what was sent hardly varies)."""
        heard = np.array(self._heard)[-frames:]
        sent = np.array(self._sent)[-frames - MAX_FRAMES :]
        if np.std(sent) < VARIED_DB:
            return None
        heard = heard - heard.mean()
        scores = []
        for lag in range(MAX_FRAMES + 1):
            part = sent[MAX_FRAMES - lag : MAX_FRAMES - lag + len(heard)]
            part = part - part.mean()
            scores.append(float(np.dot(part, heard) / (np.linalg.norm(part) * np.linalg.norm(heard) + 1e-9)))
        return scores

    def _find(self) -> None:
        scores = self._level_scores(self._window())
        if scores is None:
            return
        best = int(np.argmax(scores))
        if scores[best] < MATCH:
            return
        if self.frames is not None and (
            abs(best - self.frames) < MOVED_FRAMES or scores[self.frames] >= min(MATCH, scores[best] - CLEARER)
        ):
            self._candidate = None
            return
        if self.frames is not None and (self._candidate is None or abs(best - self._candidate) >= MOVED_FRAMES):
            self._candidate = best  # a new delay is taken once found twice in a row (a second apart)
            return
        self.frames, self.score, self._candidate = best, scores[best], None
