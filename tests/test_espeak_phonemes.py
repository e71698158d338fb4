"""piper's phonemes through our espeak-ng binding: the same as piper's own binding, without its leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.espeak_phonemes import EspeakPhonemes, install
from runtime.memory import resident_mb

pytestmark = pytest.mark.models

TEXTS = [
    "Hello there, how are you today?",
    "It's 10:49 AM on Thursday, November 26.",
    "Stop! Wait; think: is 3.5 more than e.g. three?",
    "No terminator at the end",
    "",
    "Ünïcödé — dashes… and an ellipsis",
    "你好。",
    "A [[ raw ]] bracket, (parentheses) and \"quotes\".",
]


@pytest.fixture
def espeak(monkeypatch: pytest.MonkeyPatch):
    """piper's phonemizer, set up as piper sets it up; the bridge's functions restored after."""
    from piper import espeakbridge
    from piper.phonemize_espeak import EspeakPhonemizer

    for name in ("set_voice", "get_phonemes"):
        monkeypatch.setattr(espeakbridge, name, getattr(espeakbridge, name))
    phonemizer = EspeakPhonemizer()
    espeakbridge.set_voice("en-us")
    return espeakbridge, phonemizer


def test_clauses_are_those_of_pipers_own_binding(espeak):
    bridge, _ = espeak
    ours = EspeakPhonemes(Path(bridge.__file__))
    ours.set_voice("en-us")
    for text in TEXTS:
        assert ours.get_phonemes(text) == bridge.get_phonemes(text), text
    assert [terminator for _, terminator, _ in ours.get_phonemes(TEXTS[2])] == ["!", ";", ":", "?"]
    with pytest.raises(RuntimeError, match="no-such-voice"):
        ours.set_voice("no-such-voice")


def test_phonemizing_a_piece_keeps_no_memory_once_installed(espeak):
    _, phonemizer = espeak

    def growth_over(pieces: int) -> float:
        before = resident_mb()
        for i in range(pieces):
            phonemizer.phonemize("en-us", f"{TEXTS[i % 4]} {i}")
        return resident_mb() - before

    leaked = growth_over(3000)
    install()
    growth_over(200)  # the binding's first calls allocate what it keeps using
    kept = growth_over(3000)
    assert leaked > 3 and kept < 0.5, (leaked, kept)
