"""Speech the project was never tuned on: other voices (espeak-ng and flite, faster, slower, higher,
lower), babble and street noise at 10 and 20 dB SNR, longer questions, passages read aloud and
sentences with a hesitation in them. No threshold is ever set from these clips: they are what the
standard suite is checked against (`python -m bench --local --scenarios unseen-voices,...`).

Every clip is made here, at run time, from text (its ground truth) and fixed seeds, so a run
anywhere hears the same audio. flite and espeak-ng are Debian packages (`make bench` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from bench.scenarios import RATE, Scenario, Utterance
from testkit.speech import espeak, read_wav

GAIN = 0.7


@dataclass(frozen=True)
class Speaker:
    """A synthetic voice other than the suite's: an espeak-ng voice variant or a flite voice, at a
    speed and pitch of its own (1.0: the engine's default)."""

    engine: str  # "espeak" or "flite"
    voice: str
    speed: float = 1.0
    pitch: float = 1.0

    def say(self, text: str) -> np.ndarray:
        pcm = self._espeak(text) if self.engine == "espeak" else self._flite(text)
        return (GAIN * pcm / max(1e-6, float(np.abs(pcm).max()))).astype(np.float32)

    def _espeak(self, text: str) -> np.ndarray:
        return espeak(text, RATE, ("-v", self.voice, "-s", str(round(175 * self.speed)), "-p", str(round(50 * self.pitch))))

    def _flite(self, text: str) -> np.ndarray:
        if shutil.which("flite") is None:
            raise RuntimeError("flite is not installed (apt-get install flite)")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            command = ["flite", "-voice", self.voice, "-t", text, "-o", str(path), "--setf", f"duration_stretch={1 / self.speed:.3f}"]
            command += ["--setf", f"int_f0_target_mean={round(100 * self.pitch)}"] if self.pitch != 1.0 else []
            subprocess.run(command, check=True, timeout=60, capture_output=True)
            pcm, rate = read_wav(path)
        return soxr.resample(pcm, rate, RATE).astype(np.float32) if rate != RATE else pcm


SPEAKERS = (
    Speaker("flite", "slt"),
    Speaker("espeak", "en-us+f3", speed=0.85),
    Speaker("flite", "rms", speed=1.15),
    Speaker("espeak", "en-gb+m3", pitch=0.7),
    Speaker("flite", "awb", speed=0.9, pitch=1.2),
    Speaker("espeak", "en-us+m7", speed=1.2, pitch=1.3),
    Speaker("flite", "kal16", pitch=0.85),
    Speaker("espeak", "en+f4", speed=1.0, pitch=1.5),
)

QUESTIONS = (
    "How many minutes should I boil pasta?",
    "What is the tallest mountain in Europe?",
    "Could you tell me a fun fact about octopuses?",
    "Why do leaves change colour in autumn?",
    "Is it going to rain this weekend?",
    "How far away is the moon?",
    "What should I cook for dinner tonight?",
    "Which planet has the most moons?",
    "My train leaves at half past eight.",
    "I would like to learn how to play the guitar.",
    "Remind me what a haiku is.",
    "Give me an idea for a birthday present.",
    "How do bees make honey?",
    "What language do they speak in Brazil?",
    "I think I left my keys at the office.",
    "Can dogs eat chocolate?",
    "Tell me something cheerful.",
    "What is the difference between a lake and a pond?",
)
LONG_QUESTIONS = (
    "I am planning a weekend trip to the mountains with two friends, what should we pack if the nights get cold?",
    "My neighbour keeps asking me to water her plants while she travels, how often should I water a cactus?",
    "We are going to paint the kitchen next month, which colours make a small room look bigger and brighter?",
    "If I start running three times a week from today, how long will it take before I can run five kilometres?",
    "Could you explain in simple words why the sky looks blue during the day but red at sunset?",
    "My grandmother wants to start using a smartphone, what would be the easiest way to teach her the basics?",
)
PASSAGES = (
    "The old lighthouse stood at the edge of the cliff for more than a century. Every night its keeper climbed the narrow "
    "stairs and lit the lamp, so that the fishing boats could find their way home through the fog. What happened to the "
    "keepers when the lamps became automatic?",
    "Yesterday I tried to bake bread for the first time. I mixed the flour, water, salt and yeast, waited for the dough to "
    "rise for two hours, and then baked it in a hot oven, but the loaf came out flat and dense. What did I do wrong?",
)
# (start, rest): one sentence, said whole and with a 1 s hesitation after its unfinished start.
HESITANT = (
    ("I would like to order", "a large pizza with mushrooms."),
    ("Could you please check", "when the museum opens on Sunday?"),
    ("The thing I keep forgetting is", "where I parked the car."),
    ("What would you suggest for", "a rainy afternoon with children?"),
)
HESITATION_S = 1.0
BABBLE_LINES = (
    "and then we went to the market to buy some apples",
    "I told him that the meeting was moved to Thursday",
    "she said the weather would be nice all week long",
    "there are many reasons why the project was late",
    "my brother works at the hospital near the river",
    "they never answered the letter we sent in spring",
)


def speech_power(pcm: np.ndarray) -> float:
    """Mean power over the clip's louder half of 20 ms frames: speech, not the silence around it."""
    frames = pcm[: len(pcm) // 320 * 320].reshape(-1, 320)
    power = np.sort((frames.astype(np.float64) ** 2).mean(axis=1))
    return float(power[len(power) // 2 :].mean())


def with_noise(pcm: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`pcm` with `noise` (looped to its length) at `snr_db` below the speech's power."""
    noise = np.resize(noise, len(pcm)).astype(np.float64)
    scale = np.sqrt(speech_power(pcm) / (float((noise**2).mean()) * 10 ** (snr_db / 10)))
    mixed = pcm + scale * noise
    return (mixed / max(1.0, float(np.abs(mixed).max()) / 0.99)).astype(np.float32)


def babble(seconds: float, seed: int) -> np.ndarray:
    """Four voices talking at once, none of them the speaker's words."""
    rng = np.random.default_rng(seed)
    length = int(seconds * RATE)
    out = np.zeros(length)
    for i in range(4):
        voice = Speaker("espeak", ("en+m1", "en+f2", "en-us+m4", "en+f5")[i], speed=rng.uniform(0.9, 1.2))
        talk = np.concatenate([voice.say(line) for line in rng.permutation(BABBLE_LINES)[:3]])
        start = int(rng.integers(0, max(1, len(talk) - 1)))
        out += np.resize(np.roll(talk, -start), length)
    return out.astype(np.float32)


def street(seconds: float, seed: int) -> np.ndarray:
    """Traffic: a low rumble that swells as cars pass, broadband hiss, and now and then a horn."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    rumble = np.cumsum(rng.standard_normal(n))
    rumble -= np.convolve(rumble, np.ones(800) / 800, mode="same")  # brown noise without its drift
    swell = 0.6 + 0.4 * np.sin(2 * np.pi * t / rng.uniform(2.5, 4.0)) ** 2
    out = rumble / np.abs(rumble).max() * swell + 0.15 * rng.standard_normal(n)
    for at in rng.uniform(0, max(0.1, seconds - 0.5), size=max(1, int(seconds // 4))):
        horn = (t >= at) & (t < at + 0.35)
        out[horn] += 0.5 * (np.sin(2 * np.pi * 420 * t[horn]) + 0.6 * np.sin(2 * np.pi * 525 * t[horn]))
    return out.astype(np.float32)


NOISES = {"babble": babble, "street": street}
CONDITIONS = (("babble", 20.0), ("street", 10.0), ("babble", 10.0), ("street", 20.0))


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def _trimmed(pcm: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > 0.02)
    return pcm[loud[0] : loud[-1] + 1] if len(loud) else pcm


def _noisy(text: str, speaker: Speaker, condition: tuple[str, float], seed: int) -> Utterance:
    kind, snr = condition
    speech = _trimmed(speaker.say(text))
    clean = np.concatenate([_silence(0.3), speech, _silence(0.6)])
    noise = NOISES[kind](len(clean) / RATE, seed)
    # The noise goes on after the words: where they end is known, not found in the audio.
    return Utterance(text, with_noise(clean, noise, snr), speech_end_s=0.3 + len(speech) / RATE)


def _spoken(text: str, speaker: Speaker) -> Utterance:
    return Utterance(text, np.concatenate([_trimmed(speaker.say(text)), _silence(0.3)]))


def unseen() -> dict[str, Scenario]:
    """The scenarios: `unseen-voices` (clean, eight voices), `unseen-noise` (babble and street
    noise at 10 and 20 dB), `unseen-long` (15-25 word questions, clean and noisy),
    `unseen-passage` (12-15 s read aloud), `unseen-hesitant` (each sentence whole, then with a 1 s
    hesitation; they alternate, so the two are answered in the same conditions)."""
    voices = tuple(_spoken(text, SPEAKERS[i % len(SPEAKERS)]) for i, text in enumerate(QUESTIONS[:10]))
    noise = tuple(
        _noisy(text, SPEAKERS[(i + 3) % len(SPEAKERS)], CONDITIONS[i % len(CONDITIONS)], seed=i)
        for i, text in enumerate(QUESTIONS[10:])
    )
    long = tuple(
        _spoken(text, SPEAKERS[(2 * i) % len(SPEAKERS)]) if i % 2 == 0 else _noisy(text, SPEAKERS[i], CONDITIONS[i % 4], 100 + i)
        for i, text in enumerate(LONG_QUESTIONS)
    )
    passages = tuple(_spoken(text, SPEAKERS[i * 3]) for i, text in enumerate(PASSAGES))
    hesitant: list[Utterance] = []
    for i, (start, rest) in enumerate(HESITANT):
        speaker = SPEAKERS[(i + 1) % len(SPEAKERS)]
        head, tail = _trimmed(speaker.say(start)), _trimmed(speaker.say(rest))
        text = f"{start} {rest}"
        hesitant.append(Utterance(text, np.concatenate([_trimmed(speaker.say(text)), _silence(0.3)])))
        hesitant.append(Utterance(text, np.concatenate([head, _silence(HESITATION_S), tail, _silence(0.3)])))
    named = {"voices": voices, "noise": noise, "long": long, "passage": passages, "hesitant": tuple(hesitant)}
    return {f"unseen-{name}": Scenario(f"unseen-{name}", turns) for name, turns in named.items()}


UNSEEN = "unseen-voices,unseen-noise,unseen-long,unseen-passage,unseen-hesitant"
