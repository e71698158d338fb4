"""The speech the project was never tuned on (bench/unseen.py): enough of it, other than the
standard suite's, in the voices, noise levels and lengths it claims."""

from __future__ import annotations

import numpy as np
import pytest

from bench import scenarios
from bench.scenarios import RATE
from bench.unseen import HESITATION_S, NOISES, SPEAKERS, UNSEEN, speech_power, street, unseen, with_noise

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def made() -> dict[str, scenarios.Scenario]:
    return unseen()


def test_at_least_24_questions_and_statements_none_of_the_standard_suites(made):
    assert set(made) == set(UNSEEN.split(","))
    singles = [u.text for name in ("unseen-voices", "unseen-noise", "unseen-long") for u in made[name].turns]
    assert len(set(singles)) >= 24 and all(text.strip() for text in singles)
    standard = {u.text for scenario in scenarios.builtin(scenarios.EspeakVoice()).values() for u in scenario.turns}
    standard |= set(scenarios.QUESTIONS) | {f"{a} {b}" for a, b, _ in scenarios.HESITATIONS}
    assert not standard & {u.text for scenario in made.values() for u in scenario.turns}
    long = [len(u.text.split()) for u in made["unseen-long"].turns]
    assert min(long) >= 15 and max(long) <= 25


def test_the_voices_are_several_engines_speeds_and_pitches(made):
    assert {s.engine for s in SPEAKERS} == {"espeak", "flite"} and len({s.voice for s in SPEAKERS}) == len(SPEAKERS)
    assert {s.speed > 1 for s in SPEAKERS} == {True, False} and {s.pitch > 1 for s in SPEAKERS} == {True, False}
    for utterance in made["unseen-voices"].turns:
        assert 0.5 < np.abs(utterance.pcm).max() <= 0.7 + 1e-6


def test_noise_is_mixed_at_the_snr_it_claims():
    speech = SPEAKERS[0].say("The noise is mixed at the level the clip claims.")
    for kind, make in NOISES.items():
        noise = make(len(speech) / RATE, seed=3)
        for snr in (10.0, 20.0):
            mixed = with_noise(speech, noise, snr)
            added = mixed.astype(np.float64) - speech
            measured = 10 * np.log10(speech_power(speech) / float((added**2).mean()))
            assert measured == pytest.approx(snr, abs=0.5), (kind, snr)
    assert street(2.0, seed=1).std() > 0  # the check above can fail: a silent noise has no level


def test_a_noisy_clip_says_where_its_words_end(made):
    """Noise goes on after the words, so the audio alone would put the end at the clip's end."""
    for utterance in made["unseen-noise"].turns:
        assert utterance.speech_end_s is not None and 1.0 < utterance.speech_end_s <= len(utterance.pcm) / RATE - 0.6 + 1e-6


def test_passages_run_12_to_15_seconds_and_each_hesitation_has_its_pause(made):
    passages = [len(u.pcm) / RATE for u in made["unseen-passage"].turns]
    assert all(12.0 <= seconds <= 15.5 for seconds in passages), passages
    turns = made["unseen-hesitant"].turns
    for whole, hesitant in zip(turns[::2], turns[1::2]):
        assert whole.text == hesitant.text
        assert _longest_silence_s(hesitant.pcm) >= HESITATION_S - 0.02 > _longest_silence_s(whole.pcm[: -RATE // 3])


def _longest_silence_s(pcm: np.ndarray) -> float:
    quiet = np.abs(pcm[: len(pcm) // 160 * 160].reshape(-1, 160)).max(axis=1) < 0.01
    longest = run = 0
    for frame in quiet:
        run = run + 1 if frame else 0
        longest = max(longest, run)
    return longest * 160 / RATE


def test_a_manifest_clip_says_where_its_words_end(tmp_path):
    """A clip of one's own in noise (`--manifest`) names where its words end, as the noisy clips here do."""
    import json

    from testkit.speech import write_wav

    write_wav(tmp_path / "a.wav", np.zeros(RATE, np.float32), RATE)
    turns = [{"wav": "a.wav", "text": "in noise", "speech_end_s": 0.4}, {"wav": "a.wav", "text": "clean"}]
    (tmp_path / "m.json").write_text(json.dumps({"name": "mine", "turns": turns}))
    loaded = scenarios.load_manifest(tmp_path / "m.json")
    assert [u.speech_end_s for u in loaded.turns] == [0.4, None] and [u.text for u in loaded.turns] == ["in noise", "clean"]
