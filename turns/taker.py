"""The turn taker: one session's frames in, what happened in the user's turn out."""

from __future__ import annotations

import collections
import time
from dataclasses import replace

import numpy as np
import structlog

from config import TurnConfig
from runtime.audio import FRAME_MS
from runtime.tasks import TaskOwner
from turns.events import (
    OverlapDropped,
    OverlapOnset,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnCommitted,
    TurnEvent,
)
from turns.judge import TurnEndScorers, TurnJudge
from turns.policy import POLICIES, TurnPolicy
from vad.endpointer import Endpoint, Endpointer, Kind, Phase
from vad.engines import SpeechDetector

ARRIVALS_KEPT = 10_000 // FRAME_MS + 1  # the longest commit delay a session can set
COMMA_MS = 240  # after a dropped onset of half a barge-in, the agent stays paused this much longer (a comma)


class TurnTaker:
    """Owns one session's turn detection: the speech detector, the endpointer, the policy of the
    detection type, the end-of-turn judge (when the profile has the models) and when the recent
    frames arrived. `feed()` takes each frame and returns the turn events it caused."""

    def __init__(
        self, config: TurnConfig, detector: SpeechDetector, scorers: TurnEndScorers | None, tasks: TaskOwner, log: structlog.BoundLogger
    ) -> None:
        self.judge = TurnJudge(scorers, tasks) if scorers is not None else None
        if POLICIES[config.endpointing.type].needs_judge and self.judge is None:
            log.warning("turns.no_turn_model", wanted=config.endpointing.type, using="vad")
            config = replace(config, endpointing=replace(config.endpointing, type="vad"))
        self.config = config
        self._policy: TurnPolicy = POLICIES[config.endpointing.type]
        self._detector = detector
        self._endpointer = Endpointer(config, self._policy.silences(config))
        self._arrivals: collections.deque[float] = collections.deque(maxlen=ARRIVALS_KEPT)  # of the latest frames
        self.frame_index = -1
        self._agent_speaking = False
        self._overlapping = False  # an OverlapOnset was reported and its sound is still an onset
        self._onset_ms = 0  # the voiced audio of the latest onset over the agent
        self._quiet_frames = 0  # frames since it was dropped

    def reconfigure(self, config: TurnConfig) -> None:
        """Take a session's new settings, or raise ValueError (a type this profile cannot judge)."""
        policy = POLICIES[config.endpointing.type]
        if policy.needs_judge and self.judge is None:
            raise ValueError(f"turn_detection.type {policy.name}: this profile has no end-of-turn model")
        self.config, self._policy = config, policy
        self._endpointer.reconfigure(config, policy.silences(config))

    def feed(self, frame: np.ndarray, transcript: str | None = None, judging: bool = True) -> list[TurnEvent]:
        """The turn events of this frame. `transcript`: the utterance's, once there is one, for the
        judge; `judging`: whether the policy may end the turn at a pause (not while speech over the
        agent is being judged as an interruption: that decides first)."""
        self.frame_index += 1
        in_turn = self._endpointer.in_turn
        endpoint = self._endpointer.feed(frame, self._detector.probability(frame))
        self._arrivals.append(time.monotonic())
        if in_turn and self.judge is not None:
            self.judge.feed(frame)
        events = self._overlap()
        if endpoint is not None:
            events.append(self._event(endpoint))
            if self.judge is not None and (endpoint.kind == Kind.RESUMED or (endpoint.kind == Kind.PAUSED and judging)):
                self.judge.reset()
        if judging and self._endpointer.paused:
            rule = self._policy.commit_rule(self.judge, self._endpointer.silence_ms, transcript, self.config, self._endpointer.voice_over_room_db)
            if rule is not None:
                events.append(self.commit_now(rule))
        return events

    def _event(self, endpoint: Endpoint) -> TurnEvent:
        match endpoint.kind:
            case Kind.SPEECH_STARTED:
                self._overlapping = False
                onset_ms = (endpoint.frame_index + 1 - len(endpoint.audio)) * FRAME_MS
                return SpeechStarted(endpoint.audio, onset_ms)
            case Kind.PAUSED:
                return SpeechPaused()
            case Kind.RESUMED:
                return SpeechResumed()
            case Kind.COMMITTED:
                return self._committed(endpoint, self._policy.timeout_rule)
        raise ValueError(endpoint.kind)

    def _overlap(self) -> list[TurnEvent]:
        """Sound over the agent: reported once it lasts `agent_pause_ms`, and again if it ends an
        onset too short to be speech. An onset of half the speech a barge-in needs is a first word
        as often as a cough ("Stop," or "Wait,": 160-180 ms of voice over a speakerphone's echo, the
        next word 200-280 ms later), so its end is reported only COMMA_MS later, if no other onset
        has begun by then: the agent does not play on over the user's next words."""
        onset_ms = self._endpointer.onset_ms
        if not self._overlapping:
            if self._agent_speaking and onset_ms >= self.config.interruption.agent_pause_ms:
                self._overlapping, self._onset_ms, self._quiet_frames = True, onset_ms, 0
                return [OverlapOnset()]
            return []
        if onset_ms or self._endpointer.in_turn:
            self._onset_ms, self._quiet_frames = onset_ms, 0
            return []
        self._quiet_frames += 1
        word = 2 * self._onset_ms >= self.config.interruption.bargein_min_speech_ms
        if self._quiet_frames * FRAME_MS > (COMMA_MS if word else 0):
            self._overlapping = False
            return [OverlapDropped()]
        return []

    def _committed(self, endpoint: Endpoint, rule: str) -> TurnCommitted:
        return TurnCommitted(
            rule,
            endpoint_ms=(endpoint.frame_index - endpoint.last_voiced_index) * FRAME_MS,
            audio_end_ms=(endpoint.last_voiced_index + 1) * FRAME_MS,
            voice_end_at=self.voice_end_at(),
            scores=self._policy.scores(self.judge),
        )

    def commit_now(self, rule: str) -> TurnCommitted:
        """End the turn under way at this frame (the policy, or the client, says it is over)."""
        return self._committed(self._endpointer.commit_now(), rule)

    def utterance(self, audio: tuple[np.ndarray, ...], continued: bool) -> None:
        """The speech just started is a new utterance, or (`continued`) goes on with the last one."""
        if self.judge is None:
            return
        if continued:
            for frame in audio:
                self.judge.feed(frame)
        else:
            self.judge.begin(audio)

    def new_pause(self) -> None:
        """The pause under way is judged afresh: the speech over the agent proved a turn."""
        if self.judge is not None:
            self.judge.reset()

    def dismiss(self) -> None:
        """Forget the speech under way: it was not a turn."""
        self._endpointer.dismiss()
        self.new_pause()

    def agent_speaking(self, speaking: bool) -> None:
        """While the agent speaks, speech must last `bargein_min_speech_ms` to count, and sound
        over it is reported (OverlapOnset)."""
        self._endpointer.agent_speaking(speaking)
        self._agent_speaking = speaking
        self._overlapping = self._overlapping and speaking

    @property
    def phase(self) -> Phase:
        """Where the user's speech stands: none, an onset, speaking, or paused."""
        return self._endpointer.phase

    @property
    def in_turn(self) -> bool:
        return self._endpointer.in_turn

    @property
    def voiced(self) -> bool:
        """Whether the frame just fed was voiced."""
        return self._endpointer.last_voiced_index == self.frame_index

    def voice_end_at(self) -> float:
        """When the user's last voiced frame came in (monotonic clock)."""
        if not self._arrivals:  # a typed message before any audio
            return time.monotonic()
        back = self.frame_index - self._endpointer.last_voiced_index
        return self._arrivals[-1 - min(back, len(self._arrivals) - 1)]
