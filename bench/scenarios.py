"""Scenarios the harness plays: clips with a manifest, built in (synthesized with piper) or on disk.

A manifest is JSON: `{"name", "turns": [{"wav", "text", "when", "bargein_after_ms",
"expect_reply"}]}`, with `wav` relative to the manifest. `when` is `after_reply` (speak once the
agent has finished, or at once for the first turn) or `bargein` (speak `bargein_after_ms` into the
agent's audio). A `bargein` turn with `expect_reply: false` is a backchannel or a noise: the
reply it is spoken over should go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testkit.speech import read_wav

RATE = 16000


@dataclass(frozen=True)
class Utterance:
    text: str  # what is said; "" for noise or silence
    pcm: np.ndarray  # mono float32 at RATE
    when: str = "after_reply"
    bargein_after_ms: int = 0
    expect_reply: bool = True
    # Where the speech ends in the clip, when its audio cannot tell (speech in noise); else found
    # from the audio.
    speech_end_s: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    turns: tuple[Utterance, ...]


def load_manifest(path: Path) -> Scenario:
    manifest = json.loads(path.read_text())
    turns = []
    for turn in manifest["turns"]:
        pcm, rate = read_wav(path.parent / turn["wav"])
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
                turn.get("speech_end_s"),
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


class EspeakVoice:
    """espeak-ng's English voice (the Debian package), a second speaker for the clips."""

    def say(self, text: str) -> np.ndarray:
        from testkit.speech import espeak

        return espeak(text, RATE) * 0.7


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def cough(seed: int = 0) -> np.ndarray:
    """Two cough-like bursts: noise with a sharp attack and a fast decay, no pitch."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(0.22 * RATE)) / RATE
    bursts = []
    for loudness in (0.5, 0.35):
        noise = np.convolve(rng.standard_normal(len(t)), np.ones(4) / 4, mode="same")  # duller than white
        bursts += [loudness * noise * np.minimum(1.0, t / 0.01) * np.exp(-t / 0.06), _silence(0.12)]
    return np.concatenate(bursts).astype(np.float32)


def _speech_only(pcm: np.ndarray) -> np.ndarray:
    """The clip from its first sound to its last: the engines pad each phrase with silence."""
    from bench.analysis import speech_segments

    segments = speech_segments(pcm, RATE)
    return pcm[int(segments[0][0] * RATE) : int(segments[-1][1] * RATE)] if segments else pcm


def hesitation(voice: Voice | EspeakVoice, start: str, rest: str, pause_s: float) -> Utterance:
    """One sentence with a real `pause_s` of silence after its unfinished start."""
    pcm = np.concatenate([_speech_only(voice.say(start)), _silence(pause_s), _speech_only(voice.say(rest))])
    return Utterance(f"{start} {rest}", np.concatenate([pcm, _silence(0.3)]))


# (start, rest, pause in seconds): each start is unfinished on its own.
HESITATIONS = (
    ("I want to book a table", "for two people tomorrow evening.", 0.8),
    ("Can you tell me", "what the weather will be like tomorrow?", 0.6),
    ("I was wondering if", "you could recommend a good restaurant.", 1.0),
    ("Please remind me to", "call my mother at six.", 0.9),
    ("What is the best way to", "get to the train station?", 0.7),
    ("I need to buy", "some milk and bread on the way home.", 1.2),
    ("Could you explain how", "a rainbow is formed?", 0.5),
    ("My favourite book is", "The Hobbit by Tolkien.", 0.8),
    ("Set an alarm for", "seven in the morning.", 1.1),
    ("How long does it take to", "boil an egg?", 0.6),
)
QUESTIONS = (
    "What is the capital of France?",
    "How is the weather today?",
    "What time is it?",
    "Can you recommend a good book?",
    "Where is the nearest pharmacy?",
    "How do I make a cup of tea?",
    "Who wrote Romeo and Juliet?",
    "Thank you, goodbye.",
)


# (a request with a long answer, what the user says into it)
BARGEINS = (
    ("Tell me a long story about a dragon.", "Wait, stop please."),
    ("Describe the city of Paris in detail.", "Sorry, can I ask something else?"),
    ("Explain how a car engine works.", "Hold on, that is enough."),
    ("Tell me about the history of Rome.", "Stop, I have a question."),
    ("What can you tell me about the ocean?", "Actually, never mind."),
)
BACKCHANNELS = (
    ("Tell me about the moon.", "Mm-hmm."),
    ("Describe a typical day of a farmer.", "Okay."),
    ("Tell me a story about a cat.", None),  # a cough
    ("Explain how rain forms.", "Yeah."),
    ("What do you know about elephants?", "Uh-huh."),
    ("Tell me about the history of tea.", "I see."),
)
# How the speech engines are made to say what a listener says: given "Mm-hmm" both read the letters
# (espeak-ng phonemizes it [ɛmɛmhəm], "em-em-hum"), given "Um-hum" they hum [ʌmhʌm].
SPOKEN_AS = {"Mm-hmm.": "Um-hum."}


def spoken_over(voices: tuple[Voice | EspeakVoice, ...], pairs: tuple[tuple[str, str | None], ...], turn: bool) -> tuple[Utterance, ...]:
    """Each request, then what is said into its reply: a turn (`turn`, a barge-in) or not."""
    turns: list[Utterance] = []
    for i, (request, over) in enumerate(pairs):
        voice = voices[i % len(voices)]
        pcm = cough(i) if over is None else _speech_only(voice.say(SPOKEN_AS.get(over, over)))
        turns += [
            Utterance(request, voice.say(request)),
            Utterance(over or "", np.concatenate([pcm, _silence(0.3)]), "bargein", 1500 if turn else 1000, turn),
        ]
    return tuple(turns)


def builtin(voice: Voice, second: EspeakVoice | None = None) -> dict[str, Scenario]:
    """The built-in scenarios; `hesitate`, `complete`, `bargein`, `backchannel` and `speakerphone`
    alternate `voice` and `second`."""
    say = voice.say
    voices = (voice, second or voice)
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
        "bargein": Scenario("bargein", spoken_over(voices, BARGEINS, turn=True)),
        "backchannel": Scenario("backchannel", spoken_over(voices, BACKCHANNELS, turn=False)),
        "pause": Scenario("pause", (Utterance("Please book a table for two at seven tonight.", paused),)),
        "hesitate": Scenario(
            "hesitate",
            tuple(hesitation(voices[i % 2], *parts) for i, parts in enumerate(HESITATIONS)),
        ),
        "complete": Scenario(
            "complete",
            tuple(Utterance(text, voices[i % 2].say(text)) for i, text in enumerate(QUESTIONS)),
        ),
        # Requests for long replies, each heard to its end: with `--room`, whether the agent's own
        # voice coming back through the microphone pauses or stops them (self-interruptions).
        "speakerphone": Scenario(
            "speakerphone",
            tuple(Utterance(text, voices[i % 2].say(text)) for i, (text, _) in enumerate(BARGEINS + BACKCHANNELS)),
        ),
        "noise": Scenario("noise", (Utterance("", noise, expect_reply=False),)),
        "silence": Scenario("silence", (Utterance("", _silence(3.0), expect_reply=False),)),
    }
