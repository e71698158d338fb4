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
PLAYOUT_START_MS = 60  # a speakerphone client's playout buffer: it plays once this much came in
PLAYOUT_MAX_MS = 300  # and drops the oldest beyond this (after a stalled loop's burst)
ECHO_LEAD_FRAMES = 2  # echo held before the microphone sends any (see SpeakerphoneMic)


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
        if len(played) == 0:  # (np.convolve would turn the empty span into samples of its own)
            return np.zeros(0, dtype=np.float32)
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
    """A client's microphone beside its loudspeaker, on one device clock: the frames it sends are
    what it is told to say plus the room's echo of what the loudspeaker plays in the same 20 ms.
    Received audio (`play()`, as it arrives) waits in the loudspeaker's buffer, which starts once
    `PLAYOUT_START_MS` is in and plays a frame for each frame the microphone takes, so the echo
    keeps a fixed delay behind the audio played, as on a real device; arrivals that come in bursts
    or late only fill or drain the buffer (an empty one plays silence and starts over)."""

    def __init__(self, sample_rate: int, room: SpeakerRoom) -> None:
        super().__init__(sample_rate)
        self._room = room
        self._down = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32")
        self._up = soxr.ResampleStream(SAMPLE_RATE, sample_rate, 1, dtype="float32")
        self._speaker = np.zeros(0, dtype=np.float32)  # received, not yet played
        self._playing = False
        # The echo of what was played, not yet sent. The resamplers hand it out in uneven chunks
        # (and late at first): it is sent from once ECHO_LEAD_FRAMES are in, so a frame never
        # finds too little and the echo keeps its delay.
        self._echo = np.zeros(0, dtype=np.float32)
        self._echoing = False

    def play(self, pcm: np.ndarray) -> None:
        """Audio the client received, for its loudspeaker."""
        self._speaker = np.concatenate([self._speaker, pcm.astype(np.float32)])
        most = self.sample_rate * PLAYOUT_MAX_MS // 1000
        self._speaker = self._speaker[-most:]

    def _loudspeaker(self, samples: int) -> np.ndarray:
        """What the loudspeaker plays while the microphone takes `samples`."""
        self._playing = self._playing or len(self._speaker) >= self.sample_rate * PLAYOUT_START_MS // 1000
        if not self._playing:
            return np.zeros(samples, dtype=np.float32)
        played, self._speaker = self._speaker[:samples], self._speaker[samples:]
        if len(played) < samples:
            self._playing = False
            played = np.concatenate([played, np.zeros(samples - len(played), dtype=np.float32)])
        return played

    def next_frame(self) -> np.ndarray:
        frame = super().next_frame().astype(np.float32) / 32768
        echo = self._up.resample_chunk(self._room.echo(self._down.resample_chunk(self._loudspeaker(len(frame)))))
        self._echo = np.concatenate([self._echo, echo])
        self._echoing = self._echoing or len(self._echo) >= ECHO_LEAD_FRAMES * len(frame)
        if self._echoing:
            take = min(len(self._echo), len(frame))
            frame[:take] += self._echo[:take]
            self._echo = self._echo[take:]
        return float_to_int16(frame)
