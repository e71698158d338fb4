"""The end-of-turn judge: is the user done at this pause, or only hesitating? (What semantic turn
detection decides with.)"""

from __future__ import annotations

import asyncio
import collections
import enum
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from vad.background import NOISY_DB

# eagerness -> (text score that ends the turn, text score below which it goes on, audio score that
# ends the turn when the text says neither). The text check is the surer of the two: on synthetic
# voices the audio model is swayed by intonation both ways.
EAGERNESS = {"low": (0.3, 0.02, 0.7), "medium": (0.1, 0.01, 0.5), "high": (0.03, 0.003, 0.3)}
RESCORE_MS = 500  # the audio is scored again after this much more silence
AUDIO_AFTER_MS = 500  # with a text check, the audio is first scored after this much silence
AUDIO_FRAMES = 8000 // FRAME_MS  # the audio model reads the last 8 s
# From this far into a pause its frames are the room's floor (`BackgroundLevel`), and the room is
# noisy if the user's voice is less than NOISY_DB over it: the ASR mishears there so often that a
# transcript scored unfinished is no proof of a hesitation.
NOISY_FROM_MS = 300
# Asks how far the user's voice stands over the room's floor now, in dB (None before they spoke).
RoomLevel = Callable[[], float | None]


@dataclass(frozen=True)
class TurnEndScorers:
    """What a profile can judge an end of turn with: the audio of the utterance and its transcript
    (either may be missing). Each returns P(the turn is complete)."""

    audio: Callable[[np.ndarray], Awaitable[float]] | None = None
    text: Callable[[str], Awaitable[float | None]] | None = None


@dataclass
class TurnScores:
    audio: float | None = None
    text: float | None = None
    question: bool = False  # the ASR ended the transcript with a question mark
    noisy: bool = False  # the pause's room was noisy (NOISY_DB): the transcript may be misheard


class Verdict(enum.StrEnum):
    COMPLETE = "complete"  # commit after min_commit_ms of silence
    UNSURE = "unsure"  # the text could end here, the ASR heard no question: commit halfway to max_commit_ms
    UNFINISHED = "unfinished"  # wait for max_commit_ms
    UNKNOWN = "unknown"  # the scores are not in yet


def turn_verdict(scores: TurnScores, eagerness: str, text_expected: bool) -> Verdict:
    """The verdict on a pause's scores. `text_expected`: a text score is on its way (or the
    transcript is still coming); the audio alone decides only when no text will come. Where the
    words could end or go on, a question mark settles it: the ASR writes one from the audio
    of the words, not only from their order, and a finished question so often leaves room for more
    ("Can you recommend a good book ... for a child?") that the text check is unsure of it. In a
    noisy room a text that cannot end is weighed as one that could: the words scored are as often
    misheard ("Calvall is the Eiffel Tower.") as unfinished, and waiting `max_commit_ms` on each is
    what a user in a cafe would hear most; the audio decides, at most halfway to it."""
    ends, goes_on, audio_ends = EAGERNESS[eagerness]
    if scores.text is not None:
        if scores.text >= ends:
            return Verdict.COMPLETE
        if scores.text < goes_on and not scores.noisy:
            return Verdict.UNFINISHED
        if scores.question:
            return Verdict.COMPLETE
    elif text_expected:
        return Verdict.UNKNOWN
    if scores.audio is None:
        return Verdict.UNKNOWN
    if scores.audio < audio_ends:
        return Verdict.UNFINISHED
    return Verdict.COMPLETE if scores.text is None else Verdict.UNSURE


class TurnJudge:
    """Owns one session's end-of-turn judgement: the recent audio of the utterance and the scores
    of the pause under way (the audio scored at the pause and again as the silence grows, the
    transcript once the ASR has it). The Controller asks `verdict()` at each silent frame."""

    def __init__(self, scorers: TurnEndScorers, tasks: TaskOwner) -> None:
        self._scorers = scorers
        self._tasks = tasks
        self._audio: collections.deque[np.ndarray] = collections.deque(maxlen=AUDIO_FRAMES)
        self.scores = TurnScores()
        self._pending: list[asyncio.Task[None]] = []
        self._audio_scored_at: int | None = None  # silence (ms) when the audio was last scored
        self._text_asked = False
        self._text_done = False

    def begin(self, frames: tuple[np.ndarray, ...]) -> None:
        self._audio.clear()
        self._audio.extend(frames)

    def feed(self, frame: np.ndarray) -> None:
        self._audio.append(frame)

    def reset(self) -> None:
        """A new pause, or speech again: the last pause's scores are moot."""
        for task in self._pending:
            self._tasks.cancel(task)
        self._pending = []
        self.scores = TurnScores()
        self._audio_scored_at = None
        self._text_asked = False
        self._text_done = False

    def step(self, silence_ms: int, transcript: str | None, voice_over_room_db: RoomLevel | None = None) -> None:
        """Start what is due at this silent frame: the text score, an audio score. With a text
        check the audio is first scored after AUDIO_AFTER_MS of silence: the text decides most
        turns sooner, the audio matters only where the text could end or go on (a commit halfway
        to max_commit_ms), and scored at the pause it would take the CPU from the speculative
        reply. `voice_over_room_db`: the user's voice over the room's floor now, asked only from
        NOISY_FROM_MS; once the pause has found the room noisy it stays so (the noise may stop
        before the pause ends)."""
        if silence_ms >= NOISY_FROM_MS and voice_over_room_db is not None and not self.scores.noisy:
            level = voice_over_room_db()
            self.scores.noisy = level is not None and level < NOISY_DB
        first_at = 0 if self._scorers.text is None else AUDIO_AFTER_MS
        if self._scorers.audio is not None and silence_ms >= first_at and (
            self._audio_scored_at is None or silence_ms - self._audio_scored_at >= RESCORE_MS
        ):
            self._audio_scored_at = silence_ms
            self._start("audio", self._scorers.audio(np.concatenate(self._audio)))
        if self._scorers.text is not None and transcript is not None and not self._text_asked:
            self._text_asked = True
            self.scores.question = transcript.rstrip().endswith("?")
            self._start("text", self._scorers.text(transcript))

    def _start(self, kind: str, score: Awaitable[float | None]) -> None:
        scores = self.scores

        async def run() -> None:
            value = await score
            if scores is self.scores:  # the scores of a pause that ended are dropped with it
                setattr(scores, kind, value)
                self._text_done = self._text_done or kind == "text"

        self._pending.append(self._tasks.spawn(run(), f"turn-end:{kind}"))

    def verdict(self, eagerness: str) -> Verdict:
        return turn_verdict(self.scores, eagerness, self._scorers.text is not None and not self._text_done)
