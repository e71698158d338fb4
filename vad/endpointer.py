"""The endpointer: speech probabilities in, turn events out (started, paused, resumed, committed).

Hysteresis: a frame counts as voiced at `threshold` and as silent only below `threshold - 0.15`;
in between it keeps the previous class. A silence, once it is one, began at the first frame under
`threshold` if the probability fell from there within FALL_FRAMES: the user stopped as it began
to fall. (A longer stretch in between is quiet speech.)
Speech-like sound that the background level judges the room's (babble, traffic: well under the
user's voice, `vad/background.py`) starts no turn, and ends one once it lasts ROOM_FRAMES.
Durations count 20 ms frames, so the same audio always gives the same events.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

import numpy as np

from config import TurnConfig
from runtime.audio import FRAME_MS
from vad.background import BackgroundLevel

HYSTERESIS = 0.15
ONSET_GAP_FRAMES = 2  # unvoiced frames tolerated inside a speech onset before it is dropped
RESUME_MS = 60  # voiced audio inside a pause that counts as the user speaking again
FALL_FRAMES = 3  # the longest fall of the speech probability that is still the end of speech
# In speech, the room's sound ends it only once it has lasted this long (then from where it began):
# a soft last consonant, as quiet as the babble, is the user's, and silence follows it.
ROOM_FRAMES = 6


@dataclass(frozen=True)
class Silences:
    """The silences that end a stretch of speech, as the turn-detection policy sets them: a pause
    (the speculative reply starts) and a commit (None: the endpointer never commits by itself)."""

    pause_ms: int
    commit_ms: int | None


class Phase(enum.StrEnum):
    """Where a stream of audio stands: no speech, a sound that may be speech, speech, a pause in it."""

    IDLE = "idle"
    ONSET = "onset"
    SPEAKING = "speaking"
    PAUSED = "paused"


class Kind(enum.StrEnum):
    SPEECH_STARTED = "speech_started"
    PAUSED = "paused"
    RESUMED = "resumed"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Endpoint:
    kind: Kind
    frame_index: int  # the frame that caused the event
    last_voiced_index: int  # the last voiced frame before it
    audio: tuple[np.ndarray, ...] = field(default=(), repr=False)  # SPEECH_STARTED: prefix + onset frames


class Endpointer:
    """Owns one stream's endpointing state, including how long speech must last to count: longer
    while the agent talks (`agent_speaking`), so that a barge-in is confirmed speech."""

    def __init__(self, config: TurnConfig, silences: Silences) -> None:
        self.config = config
        self.silences = silences
        self._agent_speaking = False
        self._prefix: collections.deque[np.ndarray] = collections.deque(maxlen=self._prefix_frames())
        self.phase = Phase.IDLE
        self._voiced = False
        self._onset: list[np.ndarray] = []
        self._onset_voiced = 0
        self._onset_gap = 0
        self._silence = 0
        self._resume = 0
        self._index = -1
        self._under = 0  # consecutive frames under the threshold
        self.last_voiced_index = -1
        self._background = BackgroundLevel()
        self._room = 0  # consecutive speech-like frames at the room's level

    def _prefix_frames(self) -> int:
        return max(1, self.config.endpointing.prefix_padding_ms // FRAME_MS)

    def reconfigure(self, config: TurnConfig, silences: Silences) -> None:
        self.config, self.silences = config, silences
        self._prefix = collections.deque(self._prefix, maxlen=self._prefix_frames())

    def agent_speaking(self, speaking: bool) -> None:
        self._agent_speaking = speaking

    @property
    def min_speech_ms(self) -> int:
        if self._agent_speaking:
            return self.config.interruption.bargein_min_speech_ms
        return self.config.endpointing.min_speech_ms

    def feed(self, frame: np.ndarray, probability: float) -> Endpoint | None:
        self._index += 1
        threshold = self.config.endpointing.threshold
        level = self._background.feed(frame)
        room = probability >= threshold - HYSTERESIS and self._background.is_background()
        self._room = self._room + 1 if room else 0
        if room and (self.phase != Phase.SPEAKING or self._room >= ROOM_FRAMES):
            probability = 0.0  # speech-like, but the room's
        elif probability >= threshold and not room and self.phase != Phase.IDLE:
            self._background.speech(level)
        if probability >= threshold:
            self._voiced, self._under = True, 0
        else:
            self._under += 1
            if probability < threshold - HYSTERESIS and self._voiced:
                self._voiced = False
                fell = self._room if self._room >= ROOM_FRAMES else (self._under if self._under <= FALL_FRAMES else 1)
                self.last_voiced_index = self._index - fell
        if self._voiced:
            self.last_voiced_index = self._index
        handler = {
            Phase.IDLE: self._idle,
            Phase.ONSET: self._onset_frame,
            Phase.SPEAKING: self._speaking,
            Phase.PAUSED: self._paused,
        }[self.phase]
        return handler(frame)

    def _event(self, kind: Kind, audio: tuple[np.ndarray, ...] = ()) -> Endpoint:
        return Endpoint(kind, self._index, self.last_voiced_index, audio)

    def _idle(self, frame: np.ndarray) -> Endpoint | None:
        if not self._voiced:
            self._prefix.append(frame)
            return None
        self.phase, self._onset, self._onset_voiced, self._onset_gap = Phase.ONSET, [], 0, 0
        return self._onset_frame(frame)

    def _onset_frame(self, frame: np.ndarray) -> Endpoint | None:
        self._onset.append(frame)
        if self._voiced:
            self._onset_voiced += 1
            self._onset_gap = 0
        else:
            self._onset_gap += 1
            if self._onset_gap > ONSET_GAP_FRAMES:  # a click or a cough, not speech
                self.phase = Phase.IDLE
                self._prefix.extend(self._onset)
                return None
        if self._onset_voiced * FRAME_MS >= self.min_speech_ms:
            audio = (*self._prefix, *self._onset)
            self._prefix.clear()
            self.phase, self._silence, self._resume = Phase.SPEAKING, 0, 0
            return self._event(Kind.SPEECH_STARTED, audio)
        return None

    def _speaking(self, frame: np.ndarray) -> Endpoint | None:
        if self._voiced:
            self._silence = 0
            return None
        self._silence = self._index - self.last_voiced_index
        if self._silence * FRAME_MS >= self.silences.pause_ms:
            self.phase, self._resume = Phase.PAUSED, 0
            return self._event(Kind.PAUSED)
        return None

    def _paused(self, frame: np.ndarray) -> Endpoint | None:
        if self._voiced:
            self._resume += 1
            if self._resume * FRAME_MS >= RESUME_MS:
                self.phase, self._silence = Phase.SPEAKING, 0
                return self._event(Kind.RESUMED)
            return None
        self._resume = 0
        self._silence += 1
        commit_ms = self.silences.commit_ms
        if commit_ms is not None and self._silence * FRAME_MS >= commit_ms:
            self.phase = Phase.IDLE
            return self._event(Kind.COMMITTED)
        return None

    @property
    def onset_ms(self) -> int:
        """Voiced audio of a speech onset not yet confirmed (0 when none is under way)."""
        return self._onset_voiced * FRAME_MS if self.phase == Phase.ONSET else 0

    def voice_over_room_db(self) -> float | None:
        """The user's speech over the room's floor, in dB (`BackgroundLevel`)."""
        return self._background.voice_over_room_db()

    @property
    def paused(self) -> bool:
        return self.phase == Phase.PAUSED

    @property
    def silence_ms(self) -> int:
        """Silence since the last voiced frame, in the pause under way."""
        return self._silence * FRAME_MS if self.paused else 0

    def dismiss(self) -> None:
        """Forget the speech under way: it was not a turn (a backchannel over the agent, or speech
        the client cleared)."""
        if self.in_turn:
            self.phase = Phase.IDLE

    @property
    def in_turn(self) -> bool:
        """Speech has been confirmed and its turn not committed: speaking, or paused."""
        return self.phase in (Phase.SPEAKING, Phase.PAUSED)

    def commit_now(self) -> Endpoint:
        """End the turn at this frame (the end-of-turn judge found it complete, or the client said so)."""
        if not self.in_turn:
            raise RuntimeError("only a turn under way can be committed")
        self.phase = Phase.IDLE
        return self._event(Kind.COMMITTED)
