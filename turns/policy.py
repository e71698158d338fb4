"""Turn-detection policies, one class per `turn_detection.type`: the silences at which a turn pauses
and is committed, and, for a policy that judges, whether a pause is the end of the turn.

A policy holds no session state (the judge it asks is the turn taker's), so one instance of each
serves every session. Adding a policy is one class here, and its name among the config's choices.
"""

from __future__ import annotations

from typing import ClassVar

from config import TurnConfig
from turns.judge import RoomLevel, TurnJudge, Verdict
from vad.endpointer import Silences


class TurnPolicy:
    """Ends a user's turn after the endpointer's silences alone (the base: nothing judged)."""

    name: ClassVar[str]
    needs_judge: ClassVar[bool] = False
    timeout_rule: ClassVar[str] = "vad"  # the rule named when the silence alone commits

    def silences(self, config: TurnConfig) -> Silences:
        return Silences(config.speculation.pause_ms, config.endpointing.commit_ms)

    def commit_rule(
        self, judge: TurnJudge | None, silence_ms: int, transcript: str | None, config: TurnConfig, voice_over_room_db: RoomLevel | None = None
    ) -> str | None:
        """At a silent frame of a pause: the rule that commits the turn now, or None to go on
        (`voice_over_room_db`: asks how far the user's voice is over the room's noise, for the judge)."""
        return None

    def scores(self, judge: TurnJudge | None) -> dict[str, float | bool]:
        """What the turn was judged on, for its metrics."""
        return {}


class VadPolicy(TurnPolicy):
    """`vad`: a fixed silence timer (`commit_ms`)."""

    name = "vad"


class ManualPolicy(TurnPolicy):
    """`manual`: only the client commits (`input_audio_buffer.commit`), as with push-to-talk."""

    name = "manual"

    def silences(self, config: TurnConfig) -> Silences:
        return Silences(config.speculation.pause_ms, None)


class SemanticPolicy(TurnPolicy):
    """`semantic`: at each silent frame of a pause the end-of-turn judge scores the turn; one judged
    complete is committed after `min_commit_ms` of silence, one that might go on halfway to
    `max_commit_ms`; anything else at `max_commit_ms`, by the silence alone."""

    name = "semantic"
    needs_judge = True
    timeout_rule = "timeout"

    def silences(self, config: TurnConfig) -> Silences:
        return Silences(config.speculation.semantic_pause_ms, config.endpointing.max_commit_ms)

    def commit_rule(
        self, judge: TurnJudge | None, silence_ms: int, transcript: str | None, config: TurnConfig, voice_over_room_db: RoomLevel | None = None
    ) -> str | None:
        assert judge is not None  # needs_judge
        judge.step(silence_ms, transcript, voice_over_room_db)
        verdict = judge.verdict(config.endpointing.eagerness)
        low, high = config.endpointing.min_commit_ms, config.endpointing.max_commit_ms
        wait_ms = {Verdict.COMPLETE: low, Verdict.UNSURE: (low + high) // 2}.get(verdict)
        return f"semantic:{verdict}" if wait_ms is not None and silence_ms >= wait_ms else None

    def scores(self, judge: TurnJudge | None) -> dict[str, float | bool]:
        assert judge is not None
        scores = judge.scores
        out: dict[str, float | bool] = {
            name: round(score, 3) for name, score in (("eot_audio", scores.audio), ("eot_text", scores.text)) if score is not None
        }
        if scores.question:
            out["eot_question"] = True
        if scores.noisy:
            out["eot_noisy"] = True
        return out


POLICIES: dict[str, TurnPolicy] = {policy.name: policy for policy in (VadPolicy(), SemanticPolicy(), ManualPolicy())}
