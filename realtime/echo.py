"""Server-side echo cancellation: the call's own output, frame by frame as it is sent, is the
reference that WebRTC's audio processing module (AEC3, from the `livekit` package) takes out of
the caller's microphone, before the VAD and the ASR hear it."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from realtime.echo_delay import EchoDelay
from runtime.audio import FRAME_MS, SAMPLE_RATE

BLOCK_MS = 10  # the module takes exactly 10 ms a call
ECHO_PATH_MS = 700  # the longest way back looked for: the client's buffer, the network and the room
AUDIBLE = 100.0**2  # a sent frame quieter than this (-50 dBFS) leaves no echo worth guarding against
UNDER_ECHO = 0.5  # over the agent, sound counts from 3 dB under the level its echo comes back at
HELD_UNDER_ECHO = 0.25  # 6 dB under it, for HOLD_MS after sound that counted (quieter sounds of the same speech)
HOLD_MS = 200
COUPLING_FRAMES = 150  # the last 3 s of echo, from which how loud it comes back is judged
COUPLING_START = 1.0  # until then: as loud as what was sent
NO_ECHO = 1e-3  # after a second, echo 30 dB under what was sent is no echo (headphones): judged at once
REACH_FRAMES = 18  # AEC3 finds an echo up to 360 ms late itself (measured live; ~450 offline): later, the reference is held back
SILENCED = 0.001  # -60 dB: loud echo, silenced, stays under what the VAD hears (Silero hears speech to -60 dBFS)


def _power(frame: np.ndarray) -> float:
    return float(np.mean(np.square(frame, dtype=np.float64)))


class ResidualGuard:
    """Owns the guard behind the canceller, for the echo its cancelling leaves (the speaker
    distorts, the room changes, the first seconds): while the agent is audible, an input frame
    that after cancelling is well under the level the agent's echo reaches the microphone at is
    silenced before the VAD hears it. That level is learnt from the microphone (before
    cancelling) in the frames the guard silences, against the loudest frame sent in the last
    `ECHO_PATH_MS`; a user talking over the agent is about as loud as its echo or louder, and
    passes, and once they do their quieter sounds pass too."""

    def __init__(self) -> None:
        self._sent: collections.deque[float] = collections.deque(maxlen=ECHO_PATH_MS // FRAME_MS)
        self._coupling: collections.deque[float] = collections.deque(maxlen=COUPLING_FRAMES)
        self._held = 0  # frames that still count from HELD_UNDER_ECHO

    def sent(self, frame: np.ndarray) -> None:
        self._sent.append(_power(frame))

    @property
    def coupling(self) -> float:
        """How loud the echo comes back, as a share of the power sent (the median of the last 3 s).
        Until 3 s of it are heard, as loud as sent: AEC3 first mutes its output, then, finding the
        delay, lets the echo through for a moment (measured 0.9-1.2 s into a call's first echo)."""
        if len(self._coupling) < COUPLING_FRAMES // 3:
            return COUPLING_START
        coupling = float(np.median(self._coupling))
        return coupling if coupling <= NO_ECHO or len(self._coupling) == COUPLING_FRAMES else COUPLING_START

    def start_over(self) -> None:
        """The echo's path changed: its level is learnt anew, taken as loud as sent meanwhile."""
        self._coupling.clear()

    def guard(self, heard: np.ndarray, cleaned: np.ndarray) -> np.ndarray:
        """`cleaned`, the canceller's output for the microphone's frame `heard`, or silence."""
        loudest = max(self._sent, default=0.0)
        if loudest < AUDIBLE:
            self._held = 0
            return cleaned
        echo = self.coupling * loudest
        if _power(cleaned) > echo * (HELD_UNDER_ECHO if self._held else UNDER_ECHO):
            self._held = HOLD_MS // FRAME_MS
            return cleaned
        self._held = max(0, self._held - 1)
        self._coupling.append(_power(heard) / loudest)
        return (cleaned * SILENCED).astype(np.int16)


class EchoCanceller:
    """Owns one call's echo canceller: `reference()` takes each output frame as it is sent,
    `clean()` returns an input frame (16 kHz mono int16) with the echo of that output taken out,
    and what is left of it silenced by the ResidualGuard.
    Whether it cancels: `mode` (`--echo-cancel`) `on` or `off` for every call; `auto` when the
    client says it does not cancel echo itself (the page, while the browser's canceller is off).
    Not for a client that says nothing: on calls without echo the canceller and its guard cost
    time to answer and to stop at a barge-in (measured: client_v2v p50 594 -> 698 ms, barge-in
    stop p95 242 -> 843 ms), so it is for callers known to need it. While off both calls pass
    everything through; the module is made on first
    use, so a call that never cancels never loads it. The echo's delay (the client's buffer, the
    network, the room: 200 to 600 ms measured here) is found by EchoDelay, and the reference held
    back by what is over REACH_FRAMES: AEC3 alone finds no echo over ~500 ms late."""

    def __init__(self, mode: str, client_cancels: bool | None = None) -> None:
        self.mode = mode
        self.enabled = False
        self.declare(client_cancels)
        self._apm: Any = None
        self._rtc: Any = None
        self._guard = ResidualGuard()
        self._delay = EchoDelay()
        self._held_back: collections.deque[np.ndarray] = collections.deque()  # sent, not yet the canceller's
        self._hold = 0  # frames the reference is held back

    def declare(self, client_cancels: bool | None) -> None:
        """What the client says of its own echo canceller (None: nothing)."""
        self.enabled = client_cancels is False if self.mode == "auto" else self.mode == "on"

    def _module(self) -> Any:
        if self._apm is None:
            from livekit import rtc  # the FFI library starts its own runtime: only for calls that cancel

            self._rtc = rtc
            self._apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
        return self._apm

    def reference(self, frame: np.ndarray, sample_rate: int) -> None:
        """An output frame (int16, any rate the module takes: 16, 32 or 48 kHz), as it is sent.
        The canceller gets it at most `REACH_FRAMES` before its echo is due, once that is found."""
        if not self.enabled:
            return
        self._delay.sent(frame)
        self._held_back.append(frame)
        hold = max(0, (self._delay.frames or 0) - REACH_FRAMES)
        if hold != self._hold:  # the canceller learns the new delay anew: the guard starts over meanwhile
            self._hold = hold
            self._guard.start_over()
        while len(self._held_back) > hold + 1:  # the delay found shrank: what is late is dropped
            self._held_back.popleft()
        # One frame to the canceller for each sent, silence while the delay found grows.
        frame = self._held_back.popleft() if len(self._held_back) > hold else np.zeros_like(frame)
        self._guard.sent(frame)
        apm, block = self._module(), sample_rate * BLOCK_MS // 1000
        for start in range(0, len(frame) - block + 1, block):
            apm.process_reverse_stream(self._rtc.AudioFrame(frame[start : start + block].tobytes(), sample_rate, 1, block))

    def clean(self, frame: np.ndarray) -> np.ndarray:
        """An input frame of 16 kHz int16 samples, without the echo of what was sent."""
        if not self.enabled:
            return frame
        self._delay.heard(frame)
        apm, block = self._module(), SAMPLE_RATE * BLOCK_MS // 1000
        out = frame.copy()
        for start in range(0, len(frame) - block + 1, block):
            audio = self._rtc.AudioFrame(frame[start : start + block].tobytes(), SAMPLE_RATE, 1, block)
            apm.process_stream(audio)
            out[start : start + block] = np.frombuffer(audio.data, dtype=np.int16)
        return self._guard.guard(frame, out)
