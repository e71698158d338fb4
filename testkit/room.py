"""A speakerphone's room, for tests and the harness: what a client's microphone picks up of the
agent audio its loudspeaker plays, later, quieter, smeared by the room and clipped by the speaker."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from realtime.output import PacedOutput
from runtime.audio import SAMPLE_RATE, float_to_int16

TAIL_S = 0.25  # the room's reverberation, after the direct path
DECAY_S = 0.05  # its energy falls by 1/e every DECAY_S
DRIVE = 1.5  # how hard the speaker is driven into its soft clipping


class SpeakerRoom:
    """Owns one microphone's echo path: `echo()` takes the audio played (float, 16 kHz) a frame
    at a time and returns what of it reaches the microphone in the same span: `delay_ms` later,
    `loss_db` quieter than what was played (the echo return loss), through a synthetic impulse
    response (a direct path and a decaying random tail, fixed by `seed`) and the speaker's soft
    clipping."""

    def __init__(self, delay_ms: int, loss_db: float, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        taps = int(TAIL_S * SAMPLE_RATE)
        response = rng.normal(0.0, 0.3, taps) * np.exp(-np.arange(taps) / (DECAY_S * SAMPLE_RATE))
        response[0] = 1.0
        self._response = (response / np.sqrt(np.sum(response**2)) * 10 ** (-loss_db / 20)).astype(np.float32)
        # What was played and is still to reach the microphone: the delay, then the room's memory.
        self._history = np.zeros(delay_ms * SAMPLE_RATE // 1000 + taps - 1, dtype=np.float32)

    def echo(self, played: np.ndarray) -> np.ndarray:
        speaker = np.tanh(DRIVE * np.asarray(played, dtype=np.float32)) / DRIVE
        window = np.concatenate([self._history, speaker])
        # Each sample heard is the response over what was played `delay` and more samples before it.
        heard = np.convolve(window[: len(self._response) - 1 + len(speaker)], self._response, mode="valid")
        self._history = window[len(speaker) :]
        return heard.astype(np.float32)


@dataclass(frozen=True)
class RoomSpec:
    """A speakerphone for every call of a run: `DELAY_MS,LOSS_DB` (`--room 150,0`)."""

    delay_ms: int
    loss_db: float

    @classmethod
    def parse(cls, text: str) -> RoomSpec:
        try:
            delay, loss = text.split(",")
            spec = cls(int(delay), float(loss))
        except ValueError:
            raise ValueError(f"a room is DELAY_MS,LOSS_DB (e.g. 150,0), not {text!r}") from None
        if not 0 <= spec.delay_ms <= 1000:
            raise ValueError("the room's delay is 0 to 1000 ms")
        return spec

    def __str__(self) -> str:
        return f"{self.delay_ms} ms, {self.loss_db:g} dB"

    def make(self, seed: int) -> SpeakerRoom:
        return SpeakerRoom(self.delay_ms, self.loss_db, seed)


class SpeakerphoneMic(PacedOutput):
    """A client's microphone beside its loudspeaker: the frames it sends are what it is told to
    say plus the room's echo of the audio the client plays (`played()`, each frame as it plays)."""

    def __init__(self, sample_rate: int, room: SpeakerRoom) -> None:
        super().__init__(sample_rate)
        self._room = room
        self._down = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32")
        self._up = soxr.ResampleStream(SAMPLE_RATE, sample_rate, 1, dtype="float32")
        self._echo = np.zeros(0, dtype=np.float32)  # echo that has reached the microphone, not yet sent

    def played(self, pcm: np.ndarray) -> None:
        echo = self._up.resample_chunk(self._room.echo(self._down.resample_chunk(pcm.astype(np.float32))))
        self._echo = np.concatenate([self._echo, echo])[-self.sample_rate :]  # a stalled sender keeps 1 s

    def next_frame(self) -> np.ndarray:
        frame = super().next_frame().astype(np.float32) / 32768
        take = min(len(self._echo), len(frame))
        frame[:take] += self._echo[:take]
        self._echo = self._echo[take:]
        return float_to_int16(frame)
