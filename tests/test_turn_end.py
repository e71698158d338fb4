"""Semantic end-of-turn detection: the decision rules on scripted scores (unit), and the real models
scoring finished and unfinished sentences (models)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from config import TurnConfig
from controller.controller import State
from realtime.events import SessionUpdate
from tests.test_controller import Rig, make_rig
from turns.judge import TurnEndScorers, TurnScores, Verdict, turn_verdict


class ScriptedScores:
    """End-of-turn scorers that answer with fixed scores, counting their calls."""

    def __init__(self, audio: float | None, text: float | None) -> None:
        self.audio_score, self.text_score = audio, text
        self.audio_calls = 0
        self.texts: list[str] = []

    async def audio(self, pcm: np.ndarray) -> float:
        self.audio_calls += 1
        return self.audio_score  # type: ignore[return-value]

    async def text(self, transcript: str) -> float | None:
        self.texts.append(transcript)
        return self.text_score

    def scorers(self, with_text: bool = True) -> TurnEndScorers:
        return TurnEndScorers(self.audio, self.text if with_text else None)


SEMANTIC = TurnConfig().updated({"type": "semantic", "min_commit_ms": 300, "max_commit_ms": 2000})


async def _pause_until(rig: Rig, limit_frames: int) -> int:
    """Silent frames (yielding to the scoring tasks between them) until the turn is committed."""
    for count in range(1, limit_frames + 1):
        rig.frames(False, 1)
        await asyncio.sleep(0)  # one loop turn per 20 ms frame, as frames arrive in a call
        await asyncio.sleep(0)
        if rig.controller.state == State.RESPONDING:
            return count
    return -1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("scores", "text_expected", "verdict"),
    [
        (TurnScores(audio=0.1, text=0.5), True, Verdict.COMPLETE),  # the text decides
        (TurnScores(audio=0.99, text=0.001), True, Verdict.UNFINISHED),
        (TurnScores(audio=0.9, text=0.05), True, Verdict.UNSURE),  # could end here: wait longer
        (TurnScores(audio=0.2, text=0.05), True, Verdict.UNFINISHED),
        (TurnScores(audio=None, text=0.05, question=True), True, Verdict.COMPLETE),  # the ASR heard a question
        (TurnScores(audio=None, text=0.005, question=True), True, Verdict.UNFINISHED),  # "Can you tell me?"
        (TurnScores(audio=0.9, text=None), True, Verdict.UNKNOWN),  # the text score is coming
        (TurnScores(audio=0.9, text=None), False, Verdict.COMPLETE),  # no text check: audio alone
        (TurnScores(audio=None, text=None), False, Verdict.UNKNOWN),
        # In a noisy room a text that cannot end is weighed as one that could: the audio decides.
        (TurnScores(audio=0.9, text=0.001, noisy=True), True, Verdict.UNSURE),
        (TurnScores(audio=0.2, text=0.001, noisy=True), True, Verdict.UNFINISHED),
        (TurnScores(audio=None, text=0.001, noisy=True), True, Verdict.UNKNOWN),
        (TurnScores(audio=0.1, text=0.5, noisy=True), True, Verdict.COMPLETE),
    ],
)
def test_the_verdict_on_a_pauses_scores(scores, text_expected, verdict):
    assert turn_verdict(scores, "medium", text_expected) == verdict


@pytest.mark.unit
def test_eagerness_moves_the_line():
    scores = TurnScores(audio=0.9, text=0.05)
    assert [turn_verdict(scores, e, True) for e in ("low", "medium", "high")] == [
        Verdict.UNSURE, Verdict.UNSURE, Verdict.COMPLETE
    ]


def _semantic_rig(tmp_path, scores: ScriptedScores, with_text: bool = True) -> Rig:
    return make_rig(tmp_path, config=SEMANTIC, turn_end=scores.scorers(with_text))


@pytest.mark.unit
async def test_a_finished_turn_is_committed_after_the_minimum_silence(tmp_path):
    scores = ScriptedScores(audio=0.2, text=0.6)
    rig = _semantic_rig(tmp_path, scores)
    rig.frames(True, 30)
    frames = await _pause_until(rig, 120)
    # 300 ms (15 frames) at the least; the scores take a few frames to come in.
    assert 15 <= frames <= 20, frames
    # The speculative transcript (30 voiced frames and the 6 silent ones up to the pause, 120 ms
    # in semantic mode), scored once.
    assert scores.texts == ["utterance of 36 frames"]
    done = await rig.play_until_done()
    metrics = rig.of("metrics.turn")[-1]
    assert metrics["commit_rule"] == "semantic:complete" and metrics["eot_text"] == 0.6
    assert metrics["endpoint_ms"] == frames * 20 and done["response"]["status"] == "completed"


@pytest.mark.unit
async def test_an_unfinished_turn_waits_for_the_maximum_silence(tmp_path):
    scores = ScriptedScores(audio=0.95, text=0.001)
    rig = _semantic_rig(tmp_path, scores)
    rig.frames(True, 30)
    frames = await _pause_until(rig, 120)
    assert frames == 100  # 2000 ms: the endpointer's fallback
    assert rig.of("metrics.turn") == [] and scores.audio_calls == 3  # scored at 0.5, 1 and 1.5 s
    await rig.play_until_done()
    assert rig.of("metrics.turn")[-1]["commit_rule"] == "timeout"


@pytest.mark.unit
async def test_with_a_text_check_the_audio_is_scored_only_in_a_longer_pause(tmp_path):
    scores = ScriptedScores(audio=0.9, text=0.6)
    rig = _semantic_rig(tmp_path, scores)
    rig.frames(True, 30)
    assert await _pause_until(rig, 120) <= 20  # committed on the text alone
    await rig.play_until_done()
    assert scores.audio_calls == 0 and "eot_audio" not in rig.of("metrics.turn")[-1]


@pytest.mark.unit
async def test_a_turn_that_might_go_on_waits_halfway(tmp_path):
    rig = _semantic_rig(tmp_path, ScriptedScores(audio=0.9, text=0.05))
    rig.frames(True, 30)
    assert await _pause_until(rig, 120) == 58  # the first frame at or past (300 + 2000) / 2 ms


@pytest.mark.unit
async def test_the_judge_notes_a_question_mark_with_the_transcript():
    from turns.judge import TurnJudge
    from runtime.tasks import TaskOwner

    tasks = TaskOwner("test")
    for transcript, question in (("Can you recommend a good book?", True), ("My favourite book is.", False)):
        judge = TurnJudge(ScriptedScores(audio=0.9, text=0.05).scorers(), tasks)
        judge.step(120, transcript)
        await asyncio.gather(*tasks.tasks)
        assert (judge.scores.text, judge.scores.question) == (0.05, question)
        assert judge.verdict("medium") == (Verdict.COMPLETE if question else Verdict.UNKNOWN)


@pytest.mark.unit
async def test_without_a_text_check_the_audio_decides(tmp_path):
    rig = _semantic_rig(tmp_path, ScriptedScores(audio=0.9, text=None), with_text=False)
    rig.frames(True, 30)
    assert 15 <= await _pause_until(rig, 120) <= 17


@pytest.mark.unit
async def test_speech_resuming_in_the_pause_drops_its_scores(tmp_path):
    scores = ScriptedScores(audio=0.2, text=0.001)
    rig = _semantic_rig(tmp_path, scores)
    rig.frames(True, 30)
    assert await _pause_until(rig, 30) == -1  # unfinished: still waiting after 600 ms
    assert rig.controller.turns.judge.scores.text == 0.001
    rig.frames(True, 5)
    assert rig.controller.state == State.USER_SPEAKING and rig.controller.turns.judge.scores == TurnScores()
    scores.text_score = 0.7  # the whole sentence is finished now
    assert 15 <= await _pause_until(rig, 120) <= 20
    assert len(scores.texts) == 2


@pytest.mark.unit
async def test_session_update_switches_turn_detection(tmp_path):
    rig = make_rig(tmp_path)  # fakes without any end-of-turn scorer
    rig.controller.on_client_event(SessionUpdate({"turn_detection": {"type": "semantic"}}, event_id="e1"))
    assert rig.of("error")[-1]["error"]["event_id"] == "e1" and rig.controller.config.endpointing.type != "semantic"
    rig = _semantic_rig(tmp_path, ScriptedScores(audio=0.5, text=0.5))
    rig.controller.on_client_event(SessionUpdate({"turn_detection": {"type": "vad", "commit_ms": 600}}))
    rig.controller.on_client_event(SessionUpdate({"turn_detection": {"type": "semantic", "eagerness": "high"}}))
    public = rig.of("session.updated")[-1]["session"]["turn_detection"]
    assert (public["type"], public["eagerness"], public["commit_ms"]) == ("semantic", "high", 600)
    rig.controller.on_client_event(SessionUpdate({"turn_detection": {"eagerness": "sometimes"}}, event_id="e2"))
    assert rig.of("error")[-1]["error"]["event_id"] == "e2"


@pytest.mark.models
async def test_the_models_score_a_finished_sentence_above_an_unfinished_one(embedded_models):
    from bench.scenarios import Voice

    scorers = embedded_models.turn_end
    voice = Voice()
    finished, unfinished = "What time is it?", "So I was wondering if"
    audio = {}
    for text in (finished, unfinished):
        pcm = voice.say(text)
        pcm = pcm[: np.flatnonzero(np.abs(pcm) > 0.01)[-1] + 1]
        audio[text] = await scorers.audio(np.concatenate([pcm, np.zeros(4000, dtype=np.float32)]))
    assert 0.0 <= audio[unfinished] < audio[finished] <= 1.0, audio
    text = {t: await scorers.text(t) for t in ("What is the capital of France?", "I want to book a table for")}
    assert text["I want to book a table for"] < 0.01 < 0.1 < text["What is the capital of France?"], text


@pytest.mark.models
async def test_stray_quotes_in_a_transcript_do_not_make_a_finished_sentence_unsure(embedded_models):
    """Moonshine sometimes opens a transcript with quotes it heard in a click: the sentence is
    judged on its words (with the quotes kept, "Tell me a long story about a dragon." scored
    0.006 and the turn waited max_commit_ms; live over /ws)."""
    score = embedded_models.turn_end.text
    plain = await score("Tell me a long story about a dragon.")
    assert plain >= 0.1, plain
    for transcript in ("\"'Tell me a long story about a dragon.", "'Tell me a long story about a dragon.'"):
        assert await score(transcript) == pytest.approx(plain, rel=1e-3), transcript
    assert await score("I don't know if") < 0.01


def _turn_in(noise: str, snr_db: float) -> list[np.ndarray]:
    """A sentence after 1 s of digital silence, in `noise` (babble or street at `snr_db`, or none)
    that goes on for 3 s after the words."""
    from bench.unseen import NOISES, with_noise
    from testkit.speech import espeak

    speech = espeak("I would like to hear about the history of the city library.", 16000)
    clip = np.concatenate([np.zeros(4800, np.float32), speech, np.zeros(48000, np.float32)])
    if noise != "none":
        clip = with_noise(clip, NOISES[noise](len(clip) / 16000, seed=21), snr_db)
    samples = (np.clip(np.concatenate([np.zeros(16000, np.float32), clip]), -1, 1) * 32767).astype(np.int16)
    return [samples[i : i + 320] for i in range(0, len(samples) - 319, 320)]


@pytest.mark.unit
@pytest.mark.parametrize(("noise", "snr_db", "noisy"), [("street", 10.0, True), ("street", 20.0, True), ("none", 0.0, False)])
async def test_in_a_noisy_room_a_transcript_scored_unfinished_waits_only_halfway(noise, snr_db, noisy):
    """The real speech detector and background level over speech in noise: the text check scores
    the transcript unfinished and the audio model complete. In noise the turn is committed halfway
    to max_commit_ms (the transcript may be misheard); in quiet it waits max_commit_ms, as a
    hesitation's would."""
    import structlog

    from runtime.tasks import TaskOwner
    from turns.events import TurnCommitted
    from turns.taker import TurnTaker
    from vad.engines import SileroDetector

    tasks = TaskOwner("test")
    scores = ScriptedScores(audio=0.9, text=0.001)
    taker = TurnTaker(SEMANTIC, SileroDetector(), scores.scorers(), tasks, structlog.get_logger())
    committed = None
    for frame in _turn_in(noise, snr_db):
        events = taker.feed(frame, transcript="i would like to hear about the" if taker.in_turn else None)
        await asyncio.sleep(0)  # the scoring tasks answer between frames
        committed = next((e for e in events if isinstance(e, TurnCommitted)), None)
        if committed is not None:
            break
    await tasks.aclose()
    assert committed is not None
    if noisy:
        assert committed.rule == "semantic:unsure" and committed.scores.get("eot_noisy") is True, committed
        assert committed.endpoint_ms <= 1300, committed.endpoint_ms  # halfway: (300 + 2000) / 2
    else:
        assert committed.rule == "timeout" and "eot_noisy" not in committed.scores, committed
