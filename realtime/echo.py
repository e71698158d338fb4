"""Server-side echo cancellation: the call's own output, frame by frame as it is sent, is the
reference that WebRTC's audio processing module (AEC3, from the `livekit` package) takes out of
the caller's microphone, before the VAD and the ASR hear it; while the agent speaks, a linear
canceller of our own keeps a user who talks over it whole."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import soxr
import structlog

from realtime.echo_delay import MAX_FRAMES, EchoDelay
from realtime.echo_linear import LinearEcho
from runtime.audio import AUDIBLE, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, power

BLOCK_MS = 10  # the module takes exactly 10 ms a call
ECHO_PATH_MS = 700  # the longest way back looked for: the client's buffer, the network and the room
UNDER_ECHO = 0.5  # over the agent, sound counts from 3 dB under the level its echo comes back at
LINEAR_UNDER_ECHO = 0.2  # after the linear canceller, from 7 dB under it, and over what that leaves of the echo
HELD = 0.5  # and 3 dB lower still for HOLD_MS after sound that counted (quieter sounds of the same speech)
HOLD_MS = 200
# A new sound after the linear canceller, though, from 3 dB over all that: what the filter leaves of a
# syllable it has learnt less well than the rest came 0.5-1.5 dB over (live, a reply's first echo after a
# barge-in: 2-3 frames, and the VAD paused the reply). Replayed on 12 recorded double-talk calls: 52 -> 39
# onsets of echo alone, every barge-in's onset at the same frame (from 6 dB, one barge-in was lost)
NEW_SOUND = 2.0
COUPLING_FRAMES = 150  # the last 3 s of echo, from which how loud it comes back is judged
COUPLING_START = 1.0  # until then: as loud as what was sent
COUPLING_FIRST = 25  # (the microphone's own level, judged after the linear canceller, from half a second on)
NO_ECHO = 1e-3  # after a second, echo 30 dB under what was sent is no echo (headphones): judged at once
REACH_FRAMES = 18  # AEC3 finds an echo up to 360 ms late itself (measured live; ~450 offline): later, the reference is held back
# The first echo can come back as late as the delay finder looks: the microphone's level is
# learnt only after that, or once the delay is found. Learnt from the first second, a live echo that
# came back late was once judged none, and passed whole.
FIRST_ECHO_FRAMES = MAX_FRAMES
SILENCED = 0.001  # -60 dB: loud echo, silenced, stays under what the VAD hears (Silero hears speech to -60 dBFS)


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
        self._no_echo: bool | None = None  # judged again only when the coupling heard changes
        self._audible = 0  # frames with the agent audible so far: the coupling is learnt from FIRST_ECHO_FRAMES on

    def sent(self, frame: np.ndarray) -> None:
        self._sent.append(power(frame))

    @property
    def coupling(self) -> float:
        """How loud the echo comes back, as a share of the power sent (the median of the last 3 s).
        Until 3 s of it are heard, as loud as sent: AEC3 first mutes its output, then, finding the
        delay, lets the echo through for a moment (measured 0.9-1.2 s into a call's first echo)."""
        if len(self._coupling) < COUPLING_FRAMES // 3:
            return COUPLING_START
        coupling = float(np.median(self._coupling))
        return coupling if coupling <= NO_ECHO or len(self._coupling) == COUPLING_FRAMES else COUPLING_START

    @property
    def no_echo(self) -> bool:
        """Whether the microphone has heard nothing of a second of the agent (headphones): nine
        frames in ten, not the median, so an echo that comes back late in that second counts."""
        if self._no_echo is None:
            self._no_echo = len(self._coupling) >= COUPLING_FRAMES // 3 and float(np.percentile(self._coupling, 90)) <= NO_ECHO
        return self._no_echo

    def start_over(self) -> None:
        """The echo's path changed: its level is learnt anew, taken as loud as sent meanwhile.
        Not where none came back: a delay found then is a user's voice that resembled the agent's
        (live, over headphones, 0.8-1.1 s, as they talked over it)."""
        if not self.no_echo:
            self._coupling.clear()
            self._no_echo = None

    def echo_placed(self) -> None:
        """The echo's delay is found: what the microphone hears from now on is the echo that has
        come back, none is still on its way, so its level is learnt at once. (Waiting
        FIRST_ECHO_FRAMES more, the linear canceller's first half second was judged against an
        echo taken as loud as sent: live, a user barging in on a call's first reply at the
        echo's level lost their first words.)"""
        self._audible = max(self._audible, FIRST_ECHO_FRAMES)

    def guard(self, heard: np.ndarray, cleaned: np.ndarray, residual: np.ndarray | None = None, remainder: float = 0.0) -> np.ndarray:
        """`cleaned`, the canceller's output for the microphone's frame `heard`, or silence. Given
        `residual`, the linear canceller's output once it has converged, and `remainder`, what it
        may have left of the echo: the residual is judged and kept instead (AEC3's suppressor
        mutes a user talking over the echo, the linear canceller does not)."""
        if residual is None and self.no_echo:
            # Nothing to take out, and AEC3's suppressor, which has found no echo either, mutes a
            # user talking over the agent all the same (measured: 50 dB of their words, 2-4 s in).
            return heard
        loudest = max(self._sent, default=0.0)
        if loudest < AUDIBLE:
            self._held = 0
            return cleaned
        if residual is None:
            kept, threshold = cleaned, self.coupling * loudest * UNDER_ECHO
            new_sound = 1.0
        else:
            # The microphone's level is what the echo comes back at from the first half second:
            # the first seconds' caution is for AEC3's output, not for the microphone's.
            coupling = float(np.median(self._coupling)) if len(self._coupling) >= COUPLING_FIRST else COUPLING_START
            kept = np.clip(residual, -32768, 32767).astype(np.int16)
            threshold = max(remainder, coupling * loudest * LINEAR_UNDER_ECHO)
            new_sound = NEW_SOUND
        if power(kept) > threshold * (HELD if self._held else new_sound):
            self._held = HOLD_MS // FRAME_MS
            return kept
        self._held = max(0, self._held - 1)
        self._audible += 1
        if self._audible > FIRST_ECHO_FRAMES:  # before, a late echo may still be on its way
            self._coupling.append(power(heard) / loudest)
            self._no_echo = None
        return (kept * SILENCED).astype(np.int16)


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
    back by what is over REACH_FRAMES: AEC3 alone finds no echo over ~500 ms late. Once the delay
    is found, LinearEcho learns the echo too; from when it takes out 6 dB, its residual, not
    AEC3's output, is what the guard judges and keeps while the agent is audible."""

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
        self._linear = LinearEcho()
        self._aligned: int | None = None  # the delay the linear canceller was aligned to
        self._to_16k: soxr.ResampleStream | None = None
        self._pending = np.zeros(0, dtype=np.float32)  # the reference at 16 kHz, not yet a whole frame
        self._converged = False
        self.log = structlog.get_logger()  # the session binds its own

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
        self._delay.sent(self._linear_reference(frame, sample_rate))
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

    def _linear_reference(self, frame: np.ndarray, sample_rate: int) -> np.ndarray:
        """The frame at 16 kHz (float, in int16's units), for the linear canceller and the delay."""
        if sample_rate != SAMPLE_RATE and self._to_16k is None:
            self._to_16k = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32")
        samples = frame.astype(np.float32)
        if self._to_16k is not None:
            samples = self._to_16k.resample_chunk(samples)
        self._pending = np.concatenate([self._pending, samples])
        # One reference frame for each frame sent: the resampler's first chunks are short.
        part, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
        reference = np.pad(part, (FRAME_SAMPLES - len(part), 0))
        self._linear.sent(reference)
        return reference

    def clean(self, frame: np.ndarray) -> np.ndarray:
        """An input frame of 16 kHz int16 samples, without the echo of what was sent."""
        if not self.enabled:
            return frame
        self._delay.heard(frame)
        if self._delay.frames is not None and self._delay.frames != self._aligned:
            self._aligned = self._delay.frames
            self.log.info("echo.delay_found", delay_ms=self._delay.frames * FRAME_MS, match=round(self._delay.score, 2))
            self._linear.align(self._delay.frames)
            self._guard.echo_placed()
        residual = self._linear.cancel(frame)
        if self._linear.converged != self._converged:
            self._converged = self._linear.converged
            self.log.info("echo.linear_converged" if self._converged else "echo.linear_lost", left_db=round(self._linear.left_db, 1))
        apm, block = self._module(), SAMPLE_RATE * BLOCK_MS // 1000
        out = frame.copy()
        for start in range(0, len(frame) - block + 1, block):
            audio = self._rtc.AudioFrame(frame[start : start + block].tobytes(), SAMPLE_RATE, 1, block)
            apm.process_stream(audio)
            out[start : start + block] = np.frombuffer(audio.data, dtype=np.int16)
        if not self._linear.converged:
            return self._guard.guard(frame, out)
        return self._guard.guard(frame, out, residual, self._linear.remainder)
