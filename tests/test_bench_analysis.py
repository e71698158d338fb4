"""Unit: the harness's audio analysis and metrics on signals and timelines with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from bench.analysis import (
    Clip,
    Heard,
    OwnStop,
    bargein_stop_ms,
    client_v2v_ms,
    sounded_between,
    speech_end,
    speech_segments,
    self_interruptions,
    underruns,
)
from bench.metrics import word_error_rate

pytestmark = pytest.mark.unit

RATE = 16000


def tone(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def quiet(seconds: float, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    return (noise * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def test_speech_end_of_a_clip_with_known_silences():
    clip = np.concatenate([quiet(0.5), tone(1.0), quiet(0.1), tone(0.4), quiet(0.6), tone(0.3), quiet(0.7)])
    # The 0.1 s gap is inside a phrase; the 0.6 s gap separates two.
    assert speech_segments(clip, RATE) == [(0.5, 2.0), (2.6, 2.9)]
    assert speech_end(clip, RATE) == pytest.approx(2.9, abs=0.02)


def test_speech_end_ignores_faint_noise_and_handles_silence():
    clip = np.concatenate([quiet(0.3, noise=0.001), tone(0.8), quiet(1.0, noise=0.001)])
    assert speech_end(clip, RATE) == pytest.approx(1.1, abs=0.02)
    assert speech_end(quiet(2.0), RATE) is None


def timeline(spans: list[tuple[float, float]], until: float) -> list[Heard]:
    """20 ms frames from t=0 to `until`, audible inside the (start, end) spans."""
    frames = []
    for i in range(int(until / 0.02)):
        at = round(i * 0.02, 3)
        loud = any(start <= at < end for start, end in spans)
        frames.append(Heard(at, -20.0 if loud else -90.0))
    return frames


def test_client_v2v_is_speech_end_to_first_audible_reply():
    heard = timeline([(0.2, 0.4), (3.1, 5.0)], until=6.0)  # an earlier sound is not the reply
    assert client_v2v_ms(2.0, heard) == pytest.approx(1100, abs=1)
    assert client_v2v_ms(5.5, heard) is None


def test_bargein_stop_is_onset_to_last_agent_audio():
    heard = timeline([(1.0, 4.24)], until=6.0)
    assert bargein_stop_ms(4.0, heard) == pytest.approx(220, abs=1)
    assert bargein_stop_ms(5.0, heard) == 0.0  # the agent was already quiet
    assert bargein_stop_ms(4.0, timeline([(1.0, 6.0)], until=6.0)) is None  # it never stopped


def test_underruns_count_holes_in_the_received_stream():
    heard = [h for h in timeline([], until=2.0) if not 0.5 <= h.arrival < 0.6 and not 1.2 <= h.arrival < 1.3]
    assert underruns(heard, 0.0, 2.0) == 2
    assert underruns(heard, 0.0, 0.4) == 0


def test_word_error_rate_counts_edits():
    assert word_error_rate("What is the capital of France?", "what is the capital of france") == 0.0
    assert word_error_rate("book a table for two", "book the table for two") == pytest.approx(0.2)
    assert word_error_rate("book a table", "book a table now please") == pytest.approx(2 / 3)
    assert word_error_rate("It is 7.", "it is seven") == 0.0


def test_false_starts_and_cutoffs_are_agent_sound_inside_a_window():
    heard = timeline([(2.5, 4.0)], until=6.0)
    assert sounded_between(heard, 0.0, 3.0)  # a clip still playing until 3.0 s was cut off
    assert not sounded_between(heard, 0.0, 2.4)  # the agent waited for the clip's end
    assert not sounded_between(heard, 4.2, 6.0)  # noise played after the reply: no false start


def test_word_error_rate_joins_hyphenated_words():
    assert word_error_rate("Thank you, goodbye.", "Thank you, good-bye.") == 0.0
    assert word_error_rate("at seven tonight", "At 7 to-night!") == 0.0
    assert word_error_rate("good bye", "goodbye") == 1.0  # two words are not one


def test_soak_floor_slope_sees_growth_and_not_the_runs_in_flight():
    from bench.process import Holdings
    from bench.soak import Sample, SoakResult

    rng = np.random.default_rng(0)

    def soak(growth_mb_per_hour: float) -> SoakResult:
        """The server's free memory climbs 60 MB through each minute and goes at its release; piper
        holds a run's buffers (up to 200 MB) at 40 % of the samples; each grows at half the rate."""
        result = SoakResult(sessions=8, minutes=60)
        for at in range(0, 3600, 5):
            grown = growth_mb_per_hour * at / 3600 / 2
            server = 1100 + grown + 60 * (at % 60) / 60
            piper = 150 + grown + 200 * rng.random() * (rng.random() < 0.4)
            by_process = {"server": server, "models.piper_voice": piper}
            result.samples.append(Sample(at, 8, 100, Holdings(server + piper, 60, 90, by_process)))
        return result

    flat, growing = soak(0.0), soak(8.0)
    assert abs(flat.rss_floor_slope_mb_per_hour() or 0) < 0.5
    assert 7.5 < (growing.rss_floor_slope_mb_per_hour() or 0) < 8.5


def _started(reply: str, at: float) -> dict:
    return {"type": "response.audio.started", "response_id": reply, "_received": at}


def _paused(reply: str, at: float) -> dict:
    return {"type": "response.audio.paused", "response_id": reply, "_received": at}


def _interrupted(reply: str, at: float) -> dict:
    return {"type": "response.done", "response": {"id": reply, "status": "interrupted"}, "_received": at}


def test_a_reply_stopped_by_speech_over_it_or_by_the_rest_of_a_hesitant_turn_did_not_hear_itself():
    barge_in = [_started("r1", 1.0), _paused("r1", 3.3), _interrupted("r1", 4.2)]
    assert self_interruptions(barge_in, [Clip(0.0, 0.8, 0.9), Clip(3.0, 3.8, 4.0)]) == []
    # The commit cut into the pause of a turn: the reply began there and the user went on.
    hesitation = [_started("r1", 1.5), _interrupted("r1", 1.8)]
    assert self_interruptions(hesitation, [Clip(0.0, 2.7, 3.0)]) == []


def test_a_reply_stopped_after_the_user_s_speech_was_over_heard_itself():
    # Its own echo, half a second into the reply to a finished request, though within the 2 s after
    # the request's clip that a slow judgement of speech over a reply is allowed.
    echo = [_started("r1", 2.3), _paused("r1", 2.6), _interrupted("r1", 2.9)]
    assert self_interruptions(echo, [Clip(0.0, 1.8, 2.0)]) == [OwnStop("r1", 2.6, False, 2.3), OwnStop("r1", 2.9, True, 2.3)]
    # Paused twice with no clip near, and a second reply stopped before its audio began.
    alone = [_started("r1", 5.0), _paused("r1", 9.0), _paused("r1", 12.0), _interrupted("r2", 20.0)]
    assert self_interruptions(alone, [Clip(0.0, 1.8, 2.0)]) == [
        OwnStop("r1", 9.0, False, 5.0), OwnStop("r1", 12.0, False, 5.0), OwnStop("r2", 20.0, True, None)
    ]
