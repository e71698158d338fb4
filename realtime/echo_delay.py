"""How long a call's echo takes to come back: found from the levels of what was sent and what the
microphone heard, so the canceller is handed its reference that much later and works on the rest."""

from __future__ import annotations

import collections
import math

import numpy as np

from runtime.audio import AUDIBLE, power

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
MOVED_FRAMES = 3  # a delay found within 60 ms of the one in use changes nothing: the canceller re-learns at each change


def level_db(frame: np.ndarray) -> float:
    return 10 * math.log10(power(frame) + 1.0)


class EchoDelay:
    """Owns the estimate of the echo's delay in frames (None until found): the level of each frame
    sent and each frame heard, in order (both streams run at one frame each 20 ms, so the n-th
    heard frame holds the echo of the sent frame `delay` before it), and the lag at which the
    two match best, while they match clearly."""

    def __init__(self) -> None:
        self._sent: collections.deque[float] = collections.deque(maxlen=WINDOW_FRAMES + MAX_FRAMES)
        self._heard: collections.deque[float] = collections.deque(maxlen=WINDOW_FRAMES)
        self._since = 0
        self._audible = 0  # frames sent since the first audible one: before it, nothing can come back
        self.frames: int | None = None
        self.score = 0.0  # how well the levels matched at that delay
        self._candidate: int | None = None

    def sent(self, frame: np.ndarray) -> None:
        level = level_db(frame)
        self._sent.append(level)
        if self._audible or level > AUDIBLE_DB:
            self._audible += 1

    def _window(self) -> int:
        return min(len(self._heard), len(self._sent) - MAX_FRAMES, self._audible)

    def heard(self, frame: np.ndarray) -> None:
        self._heard.append(level_db(frame))
        self._since += 1
        if self._since >= (EVERY_FRAMES if self.frames is not None else SEEKING_FRAMES) and self._window() >= FIRST_FRAMES:
            self._since = 0
            self._find()

    def _find(self) -> None:
        frames = self._window()
        heard = np.array(self._heard)[-frames:]
        sent = np.array(self._sent)[-frames - MAX_FRAMES :]
        if np.std(sent) < VARIED_DB:
            return
        heard = heard - heard.mean()
        scores = []
        for lag in range(MAX_FRAMES + 1):
            part = sent[MAX_FRAMES - lag : MAX_FRAMES - lag + len(heard)]
            part = part - part.mean()
            scores.append(float(np.dot(part, heard) / (np.linalg.norm(part) * np.linalg.norm(heard) + 1e-9)))
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
