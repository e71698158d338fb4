"""What the turn taker reports of a frame: typed turn events."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SpeechStarted:
    """Speech is confirmed; `audio` holds the frames before its onset and the onset's own."""

    audio: tuple[np.ndarray, ...] = field(repr=False)
    audio_start_ms: int  # where the onset audio begins in the session's input


@dataclass(frozen=True)
class SpeechPaused:
    """The speech paused long enough that a reply is worth preparing."""


@dataclass(frozen=True)
class SpeechResumed:
    """Speech again inside the pause."""


@dataclass(frozen=True)
class TurnCommitted:
    """The user's turn is over: by `rule` (`vad`, `timeout`, `semantic:complete`, `semantic:unsure`,
    `client`), with what it was judged on (`scores`: eot_audio, eot_text, eot_question, eot_noisy)."""

    rule: str
    endpoint_ms: int  # silence between the last voiced frame and the commit
    audio_end_ms: int  # where the user's speech ended in the session's input
    voice_end_at: float  # when its last voiced frame arrived (monotonic clock)
    scores: dict[str, float | bool] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | str]:
        return {"endpoint_ms": self.endpoint_ms, "commit_rule": self.rule, **self.scores}


@dataclass(frozen=True)
class OverlapOnset:
    """Voiced sound over the agent, long enough (`agent_pause_ms`) to silence it until it proves
    speech or not."""


@dataclass(frozen=True)
class OverlapDropped:
    """That sound ended too short to be speech (a click, a cough)."""


TurnEvent = SpeechStarted | SpeechPaused | SpeechResumed | TurnCommitted | OverlapOnset | OverlapDropped
