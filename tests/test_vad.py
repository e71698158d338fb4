"""The VAD engines on synthesized speech, and the endpointer on scripted probability timelines."""

from __future__ import annotations

import numpy as np
import pytest

from config import TurnConfig
from testkit.speech import espeak
from vad.endpointer import Endpointer, Kind, Silences
from vad.engines import SileroDetector, WebRtcDetector, make_detector

pytestmark = pytest.mark.unit

VAD = TurnConfig()
TIMER = Silences(pause_ms=250, commit_ms=750)  # the fixed silence timer of turn detection `vad`

SILENCE = np.zeros(320, dtype=np.int16)


def frames_of(pcm: np.ndarray) -> list[np.ndarray]:
    samples = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    return [samples[i : i + 320] for i in range(0, len(samples) - 319, 320)]


@pytest.fixture(scope="module")
def speech_frames() -> list[np.ndarray]:
    return frames_of(espeak("The quick brown fox jumps over the lazy dog.", 16000))


@pytest.mark.parametrize("engine", ["silero", "webrtc"])
def test_engines_tell_speech_from_silence_and_noise(engine, speech_frames):
    detector = make_detector(engine)
    rng = np.random.default_rng(0)
    quiet_noise = [(rng.standard_normal(320) * 30).astype(np.int16) for _ in range(50)]
    silent = [detector.probability(f) for f in [SILENCE] * 50 + quiet_noise]
    speech = [detector.probability(f) for f in speech_frames]
    assert np.mean(np.array(silent) > 0.5) <= 0.1
    assert np.mean(np.array(speech) > 0.5) > 0.5


def test_silero_carries_its_state_across_frames_until_reset(speech_frames):
    detector = SileroDetector()
    first = [detector.probability(f) for f in speech_frames]
    carried_on = [detector.probability(f) for f in speech_frames]  # same audio, state carried from the first pass
    detector.reset()
    after_reset = [detector.probability(f) for f in speech_frames]
    assert after_reset == pytest.approx(first, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(first, carried_on)) > 1e-3


def test_webrtc_rejects_bad_aggressiveness():
    with pytest.raises(ValueError):
        WebRtcDetector(7)


def run(endpointer: Endpointer, probabilities: list[float]) -> list[tuple[int, Kind, int]]:
    out = []
    for i, p in enumerate(probabilities):
        event = endpointer.feed(SILENCE, p)
        if event:
            out.append((i, event.kind, len(event.audio)))
    return out


def test_endpointer_timeline_with_pause_resume_and_commit():
    events = run(Endpointer(VAD, TIMER), [0] * 20 + [0.9] * 30 + [0.1] * 15 + [0.9] * 5 + [0.1] * 40)
    assert events == [
        (27, Kind.SPEECH_STARTED, 15 + 8),  # 150 ms of speech, with 300 ms of prefix
        (62, Kind.PAUSED, 0),  # 13 silent frames >= 250 ms
        (67, Kind.RESUMED, 0),  # 60 ms of speech inside the pause
        (82, Kind.PAUSED, 0),
        (107, Kind.COMMITTED, 0),  # 38 silent frames after the last voiced one >= 750 ms
    ]


def test_endpointer_ignores_clicks_and_keeps_hysteresis():
    endpointer = Endpointer(VAD, TIMER)
    assert run(endpointer, [0.9, 0.9, 0, 0, 0, 0] * 5) == []  # 40 ms blips never reach 150 ms
    # 0.4 is below the threshold but above threshold - 0.15: speech stays speech.
    events = run(Endpointer(VAD, TIMER), [0.9] * 10 + [0.4] * 60 + [0.2] * 40)
    assert [k for _, k, _ in events] == [Kind.SPEECH_STARTED, Kind.PAUSED, Kind.COMMITTED]
    assert events[1][0] == 70 + 12


def test_a_silence_begins_where_the_speech_probability_began_to_fall():
    # 0.45 then 0.4: under the threshold, not yet silence; 0.1 makes it one, which began at the 0.45.
    events = run(Endpointer(VAD, TIMER), [0.9] * 20 + [0.45, 0.4] + [0.1] * 40)
    paused, committed = events[1], events[2]
    assert (paused[1], paused[0]) == (Kind.PAUSED, 20 + 12)  # the 13th frame after the last voiced one
    assert (committed[1], committed[0]) == (Kind.COMMITTED, 20 + 37)


def test_endpointer_barge_in_minimum_is_separate():
    endpointer = Endpointer(TurnConfig().updated({"bargein_min_speech_ms": 200}), TIMER)
    endpointer.agent_speaking(True)
    events = run(endpointer, [0.9] * 9 + [0.0] * 5 + [0.9] * 10)
    # 9 voiced frames (180 ms) are not enough; the later 10 (200 ms) are, and the onset audio keeps
    # the prefix (the blip and the gap, 14 frames) plus the 10 voiced frames.
    assert events == [(23, Kind.SPEECH_STARTED, 14 + 10)]


def _speech_in(noise: str, text: str, soft_last_word: bool = False) -> tuple[list[np.ndarray], float]:
    """`text` spoken after 1 s of digital silence and 0.3 s of the noise (`babble` at 10 dB SNR, or
    `none`), the noise going on 1.5 s after the words; the frames and where the words end (s)."""
    from bench.unseen import babble, with_noise

    def trimmed(pcm: np.ndarray) -> np.ndarray:
        loud = np.flatnonzero(np.abs(pcm) > 0.01)
        return pcm[loud[0] : loud[-1] + 1]

    words = text.split()
    if soft_last_word:  # the last word 15 dB under the rest, as a voice trailing off
        speech = np.concatenate([trimmed(espeak(" ".join(words[:-1]))), np.zeros(800, np.float32), 10 ** (-15 / 20) * trimmed(espeak(words[-1]))])
    else:
        speech = trimmed(espeak(text))
    clip = np.concatenate([np.zeros(4800, np.float32), speech, np.zeros(24000, np.float32)])
    if noise == "babble":
        clip = with_noise(clip, babble(len(clip) / 16000, seed=11), 10.0)
    return frames_of(np.concatenate([np.zeros(16000, np.float32), clip])), 1.3 + len(speech) / 16000


def _pauses(frames: list[np.ndarray]) -> list[float]:
    """Where the endpointer (semantic turn detection's silences) found each pause's speech to end (s)."""
    detector, endpointer = SileroDetector(), Endpointer(VAD, Silences(pause_ms=120, commit_ms=None))
    ends = []
    for frame in frames:
        event = endpointer.feed(frame, detector.probability(frame))
        if event and event.kind == Kind.PAUSED:
            ends.append((event.last_voiced_index + 1) * 0.02)
    return ends


def test_in_babble_a_turn_ends_where_the_words_end_not_where_the_noise_does():
    # Silero takes four people talking 10 dB under the user for speech: the pause came only when
    # the babble stopped, 1.5 s after the words.
    frames, end = _speech_in("babble", "Please tell me when the next bus leaves the station.")
    ends = _pauses(frames)
    assert any(end - 0.2 <= e <= end + 0.25 for e in ends), (ends, end)


def test_a_soft_last_word_in_quiet_is_still_the_user_s():
    frames, end = _speech_in("none", "I would like a cup of coffee please", soft_last_word=True)
    ends = _pauses(frames)
    assert ends and ends[-1] >= end - 0.1, (ends, end)
    assert all(e >= end - 0.1 for e in ends), "a pause inside the words"
