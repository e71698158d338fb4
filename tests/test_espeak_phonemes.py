"""piper's phonemes through our espeak-ng binding: the same as piper's own binding, without its leaks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.espeak_phonemes import EspeakPhonemes

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


# A fresh interpreter: in a long-running one, what leaks lands in free pages already resident.
GROWTH = """
import sys
from piper.phonemize_espeak import EspeakPhonemizer
from models.espeak_phonemes import install
from runtime.memory import resident_mb

phonemizer = EspeakPhonemizer()
if sys.argv[1] == "ours":
    install()

def growth(pieces):
    before = resident_mb()
    for i in range(pieces):
        phonemizer.phonemize("en-us", f"Hello there, how are you today? It is {i} now.")
    return resident_mb() - before

growth(200)  # what the first calls allocate and keep using
print(growth(3000))
"""


@pytest.mark.parametrize("binding, least_mb, most_mb", [("piper's", 3.0, 100.0), ("ours", -1.0, 0.5)])
def test_phonemizing_a_piece_keeps_no_memory_once_installed(binding, least_mb, most_mb):
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", GROWTH, binding], cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert least_mb < float(run.stdout) < most_mb, run.stdout
