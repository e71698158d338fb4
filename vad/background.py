"""Tells the user's speech from the room's background when both sound like speech: babble, a TV,
traffic. Silero scores other people talking as speech, so in a cafe a turn would never end (the
endpointer waited for the noise to stop: 600 ms after the words, in babble at 10 and 20 dB SNR).

The user is nearer the microphone than the background. A frame is background when the loudest of
its last 100 ms is both near the room's floor (the quiet end of the last 1.5 s) and well under the
user's own speech (the loud end of their last 10 s of it). It starts no turn (the babble after a
committed turn was taken for the user speaking over the reply, which waited for it); in a turn it
is silence once it has lasted 120 ms (`vad/endpointer.py`). Either test alone is not enough: in
clean speech the floor is the user's own soft syllables; across a long turn the speech's level
varies more than the background's distance from it. Where the two are not 10 dB apart nothing is
background, so clean speech is endpointed as before.
"""

from __future__ import annotations

import collections

import numpy as np

from runtime.audio import level_db

FLOOR_FRAMES = 75  # the room's floor: over the last 1.5 s
FLOOR_PERCENTILE = 10
ENVELOPE_FRAMES = 5  # a frame's level: the loudest of the last 100 ms (a syllable's peak, not its valleys)
NEAR_FLOOR_DB = 8.0
UNDER_SPEECH_DB = 10.0
SPEECH_FRAMES = 500  # the user's voice: their last 10 s of speech, over turns (the same mouth and microphone)
SPEECH_PERCENTILE = 90  # its level: the loud end
# The user's voice less than this over the room's floor: a noisy room (on a tuning set of speech in
# babble and street noise at 10 and 20 dB SNR it measured 13-31 dB a few hundred ms into a pause;
# clean speech 57-79 dB).
NOISY_DB = 32.0


class BackgroundLevel:
    """Owns one stream's recent levels: the room's floor, the user's speech level (over turns), and
    the envelope of the latest frames."""

    def __init__(self) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=FLOOR_FRAMES)
        self._envelope: collections.deque[float] = collections.deque(maxlen=ENVELOPE_FRAMES)
        self._speech: collections.deque[float] = collections.deque(maxlen=SPEECH_FRAMES)

    def feed(self, frame: np.ndarray) -> float:
        """Take in the next frame; its level (dB)."""
        level = level_db(frame)
        self._recent.append(level)
        self._envelope.append(level)
        return level

    def speech(self, level: float) -> None:
        """A frame of the user's voice."""
        self._speech.append(level)

    def _floor_and_voice(self) -> tuple[float, float]:
        return float(np.percentile(self._recent, FLOOR_PERCENTILE)), float(np.percentile(self._speech, SPEECH_PERCENTILE))

    def voice_over_room_db(self) -> float | None:
        """How far the user's speech is over the room's floor (None before they have spoken): in a
        pause, how well their words stood out of the room's noise."""
        if not self._speech:
            return None
        floor, voice = self._floor_and_voice()
        return voice - floor

    def is_background(self) -> bool:
        """Whether the latest frame is the room rather than the user (never before the user has spoken)."""
        if not self._speech:
            return False
        envelope = max(self._envelope)
        floor, voice = self._floor_and_voice()
        return envelope < floor + NEAR_FLOOR_DB and envelope < voice - UNDER_SPEECH_DB
