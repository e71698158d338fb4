"""The turn taker on scripted frames, and each turn-detection policy: the events a frame timeline
gives, the rule and scores a commit carries, sound over the agent, and settings a profile cannot
judge."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import structlog

from config import TURN_DETECTION, TurnConfig
from runtime.tasks import TaskOwner
from tests.fakes import SILENT, VOICED, ScriptedDetector
from turns.events import OverlapDropped, OverlapOnset, SpeechPaused, SpeechResumed, SpeechStarted, TurnCommitted
from turns.judge import TurnEndScorers
from turns.policy import POLICIES, ManualPolicy, SemanticPolicy, VadPolicy
from turns.taker import TurnTaker
from vad.endpointer import Phase

pytestmark = pytest.mark.unit

LOG = structlog.get_logger()


def scorers(audio: float | None, text: float | None) -> TurnEndScorers:
    async def audio_score(pcm: np.ndarray) -> float:
        return audio  # type: ignore[return-value]

    async def text_score(transcript: str) -> float | None:
        return text

    return TurnEndScorers(audio_score, text_score)


def taker(changes: dict | None = None, judge: TurnEndScorers | None = None) -> TurnTaker:
    config = TurnConfig().updated(changes or {"type": "vad"})
    return TurnTaker(config, ScriptedDetector(), judge, TaskOwner("test"), LOG)


def run(turns: TurnTaker, timeline: list[tuple[bool, int]], transcript: str | None = None) -> list[tuple[int, object]]:
    """(frame index, event) for each event of the frames `timeline` makes: (voiced, count) runs."""
    out = []
    for voiced, count in timeline:
        for _ in range(count):
            out += [(turns.frame_index, e) for e in turns.feed(VOICED if voiced else SILENT, transcript)]
    return out


def test_the_vad_policy_pauses_and_commits_on_its_timer():
    turns = taker()
    events = run(turns, [(False, 20), (True, 30), (False, 40)])
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechPaused, TurnCommitted]
    started, paused, committed = events
    # Confirmed after 150 ms of speech (frame 27), with 300 ms before the onset: from frame 5 on.
    assert started[0] == 27 and started[1].audio_start_ms == 100 and len(started[1].audio) == 15 + 8
    assert paused[0] == 49 + 13  # 13 silent frames after the last voiced one (49) reach 250 ms
    assert committed[0] == 49 + 38
    assert (committed[1].rule, committed[1].endpoint_ms, committed[1].audio_end_ms) == ("vad", 760, 1000)
    assert committed[1].scores == {} and committed[1].metrics() == {"endpoint_ms": 760, "commit_rule": "vad"}


def test_speech_inside_the_pause_resumes_the_turn():
    turns = taker()
    events = run(turns, [(True, 30), (False, 14), (True, 3), (False, 40)])
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechPaused, SpeechResumed, SpeechPaused, TurnCommitted]
    assert events[2][0] == 30 + 14 + 2  # 60 ms of speech in the pause


def test_the_manual_policy_never_commits_and_the_client_does():
    turns = taker({"type": "manual"})
    events = run(turns, [(True, 30), (False, 300)])
    assert [type(e) for _, e in events] == [SpeechStarted, SpeechPaused]
    assert turns.in_turn and turns.phase == Phase.PAUSED
    committed = turns.commit_now("client")
    assert (committed.rule, committed.endpoint_ms) == ("client", 300 * 20)
    assert not turns.in_turn


async def _silence_until_commit(turns: TurnTaker, transcript: str | None, limit: int) -> tuple[int, TurnCommitted | None]:
    for count in range(1, limit + 1):
        events = turns.feed(SILENT, transcript)
        await asyncio.sleep(0)  # the judge's scoring tasks run between frames, as in a call
        await asyncio.sleep(0)
        if committed := [e for e in events if isinstance(e, TurnCommitted)]:
            return count, committed[0]
    return -1, None


async def test_the_semantic_policy_commits_a_finished_turn_early_with_its_scores():
    turns = taker({"type": "semantic", "min_commit_ms": 300}, scorers(audio=0.2, text=0.7))
    run(turns, [(True, 30)])
    count, committed = await _silence_until_commit(turns, "What time is it?", 120)
    assert committed is not None and committed.rule == "semantic:complete"
    assert count == 15  # 300 ms of silence, not the 2000 ms of an unfinished turn
    assert committed.scores == {"eot_text": 0.7, "eot_question": True}


async def test_the_semantic_policy_waits_out_an_unfinished_turn():
    turns = taker({"type": "semantic"}, scorers(audio=0.9, text=0.001))
    run(turns, [(True, 30)])
    count, committed = await _silence_until_commit(turns, "I want to book a table for", 200)
    assert committed is not None and committed.rule == "timeout"
    assert count == 2000 // 20  # max_commit_ms
    assert committed.scores["eot_text"] == 0.001


async def test_no_early_commit_while_speech_over_the_agent_is_judged():
    turns = taker({"type": "semantic", "min_commit_ms": 300}, scorers(audio=0.9, text=0.9))
    run(turns, [(True, 30)])
    for _ in range(40):
        assert not any(isinstance(e, TurnCommitted) for e in turns.feed(SILENT, "Okay.", judging=False))
        await asyncio.sleep(0)
    count, committed = await _silence_until_commit(turns, "Okay.", 20)
    assert committed is not None and committed.rule == "semantic:complete" and count == 2  # once scored


def test_sound_over_the_agent_is_reported_and_so_is_its_end():
    turns = taker()
    turns.agent_speaking(True)
    click = run(turns, [(True, 1), (True, 1), (False, 3)])
    assert [(i, type(e)) for i, e in click] == [(1, OverlapOnset), (4, OverlapDropped)]
    # Speech: the onset is reported once and then confirmed (200 ms over the agent), never dropped.
    speech = run(turns, [(True, 10), (False, 5)])
    assert [type(e) for _, e in speech] == [OverlapOnset, SpeechStarted]
    # Without the agent speaking, sound over nothing is no overlap.
    quiet = taker()
    assert [type(e) for _, e in run(quiet, [(True, 2), (False, 3)])] == []


def test_over_the_agent_a_first_word_and_a_comma_keep_it_paused():
    """ "Stop, I have a question" as Silero heard it live through the echo canceller: "Stop," 9
    voiced frames (180 ms, under the barge-in's 200), then 200 ms before "I". The agent stays
    paused over the comma and the next words are the barge-in; it played on over them when the
    first word's end was reported at once."""
    turns = taker()
    turns.agent_speaking(True)
    stop_i_have = run(turns, [(True, 9), (False, 10), (True, 10), (False, 5)])
    assert [type(e) for _, e in stop_i_have] == [OverlapOnset, SpeechStarted]
    # A first word alone: its end is reported 240 ms after the onset is dropped (3 frames after the word).
    turns = taker()
    turns.agent_speaking(True)
    stop = run(turns, [(True, 9), (False, 30)])
    assert [(i, type(e)) for i, e in stop] == [(1, OverlapOnset), (8 + 3 + 12, OverlapDropped)]


def test_a_profile_without_an_end_of_turn_model_cannot_judge():
    turns = taker({"type": "semantic"})  # no scorers: it falls back to the timer
    assert turns.config.endpointing.type == "vad"
    with pytest.raises(ValueError, match="no end-of-turn model"):
        turns.reconfigure(TurnConfig().updated({"type": "semantic"}))
    turns.reconfigure(TurnConfig().updated({"type": "manual"}))
    assert [type(e) for _, e in run(turns, [(True, 30), (False, 100)])] == [SpeechStarted, SpeechPaused]


def test_one_policy_per_detection_type_each_with_its_silences():
    config = TurnConfig()
    assert {name: type(policy) for name, policy in POLICIES.items()} == {
        "vad": VadPolicy, "semantic": SemanticPolicy, "manual": ManualPolicy
    }
    assert set(POLICIES) == set(TURN_DETECTION)  # every type the configuration accepts has its policy
    silences = {name: policy.silences(config) for name, policy in POLICIES.items()}
    assert (silences["vad"].pause_ms, silences["vad"].commit_ms) == (250, 750)
    assert (silences["semantic"].pause_ms, silences["semantic"].commit_ms) == (120, 2000)
    assert (silences["manual"].pause_ms, silences["manual"].commit_ms) == (250, None)


def test_the_voice_ended_when_its_last_voiced_frame_arrived():
    turns = taker()
    run(turns, [(True, 30)])
    last_voiced = turns.voice_end_at()
    run(turns, [(False, 5)])
    assert turns.voice_end_at() == last_voiced
    assert turns.voiced is False
