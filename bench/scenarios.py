"""Scenarios the harness plays: clips with a manifest, built in (synthesized with piper) or on disk.

A manifest is JSON: `{"name", "turns": [{"wav", "text", "when", "bargein_after_ms",
"expect_reply"}]}`, with `wav` relative to the manifest. `when` is `after_reply` (speak once the
agent has finished, or at once for the first turn) or `bargein` (speak `bargein_after_ms` into the
agent's audio).
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000


@dataclass(frozen=True)
class Utterance:
    text: str  # what is said; "" for noise or silence
    pcm: np.ndarray  # mono float32 at RATE
    when: str = "after_reply"
    bargein_after_ms: int = 0
    expect_reply: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    turns: tuple[Utterance, ...]


def load_manifest(path: Path) -> Scenario:
    manifest = json.loads(path.read_text())
    turns = []
    for turn in manifest["turns"]:
        with wave.open(str(path.parent / turn["wav"]), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{turn['wav']}: 16-bit PCM WAV expected")
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32768
            pcm = pcm.reshape(-1, wav.getnchannels()).mean(axis=1)
            rate = wav.getframerate()
        if rate != RATE:
            import soxr

            pcm = soxr.resample(pcm, rate, RATE).astype(np.float32)
        turns.append(
            Utterance(
                turn.get("text", ""),
                pcm,
                turn.get("when", "after_reply"),
                int(turn.get("bargein_after_ms", 0)),
                bool(turn.get("expect_reply", True)),
            )
        )
    return Scenario(manifest["name"], tuple(turns))


class Voice:
    """Owns a piper voice for synthesizing the built-in clips."""

    def __init__(self) -> None:
        from piper import PiperVoice

        from profiles.embedded import piper_voice_files

        model, config = piper_voice_files()
        self._voice = PiperVoice.load(str(model), config_path=str(config))

    def say(self, text: str) -> np.ndarray:
        import soxr

        pcm = np.concatenate([c.audio_float_array for c in self._voice.synthesize(text)]) * 0.7
        return soxr.resample(pcm, self._voice.config.sample_rate, RATE).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def builtin(voice: Voice) -> dict[str, Scenario]:
    say = voice.say
    noise = (0.02 * np.random.default_rng(7).standard_normal(3 * RATE)).astype(np.float32)
    paused = np.concatenate([say("Please book a table for two"), _silence(0.4), say("at seven tonight.")])
    return {
        "single": Scenario("single", (Utterance("What is the capital of France?", say("What is the capital of France?")),)),
        "multi": Scenario(
            "multi",
            tuple(
                Utterance(text, say(text))
                for text in ("Hello, who am I talking to?", "Can you recommend a good book?", "Thank you, goodbye.")
            ),
        ),
        "bargein": Scenario(
            "bargein",
            (
                Utterance("Tell me a long story about a dragon.", say("Tell me a long story about a dragon.")),
                Utterance("Wait, stop please.", say("Wait, stop please."), when="bargein", bargein_after_ms=1500),
            ),
        ),
        "pause": Scenario("pause", (Utterance("Please book a table for two at seven tonight.", paused),)),
        "noise": Scenario("noise", (Utterance("", noise, expect_reply=False),)),
        "silence": Scenario("silence", (Utterance("", _silence(3.0), expect_reply=False),)),
    }
