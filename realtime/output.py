"""The paced output: agent PCM at any rate in, 20 ms frames at the transport's rate out, silence when
idle; and how much of a reply the client has played."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

import numpy as np
import soxr

from runtime.audio import FRAME_MS, float_to_int16, to_float

LATE_GAP_MS = 2 * FRAME_MS


class FrameClock:
    """Wall-clock pacing for a stream of fixed-length frames: tick() returns when the next one is due."""

    def __init__(self, frame_seconds: float) -> None:
        self._frame_seconds = frame_seconds
        self._start: float | None = None
        self.index = -1

    async def tick(self) -> int:
        self.index += 1
        now = time.monotonic()
        if self._start is None:
            self._start = now
        delay = self._start + self.index * self._frame_seconds - now
        if delay > 0:
            await asyncio.sleep(delay)
        return self.index


class Playout:
    """One write's way out of the output: `started` is set once its first sample is sent;
    `finished` once its last sample is sent, or once it was flushed (`flushed` then says so)."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start  # sample positions in the output's stream
        self.end = end
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.flushed = False


class PacedOutput:
    """Owns the agent audio waiting to be sent: a queue of PCM chunks cut into 20 ms frames on demand.

    write() accepts int16 or float PCM at any rate and returns its Playout; next_frame() returns
    exactly one frame, padded with silence when the queue runs dry; flush() empties the queue so
    that the next frame is silence; pause() makes every frame silence, keeping the queue, until
    resume() or flush().
    """

    def __init__(self, sample_rate: int = 48000) -> None:
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._queued = 0
        self._resamplers: dict[int, soxr.ResampleStream] = {}
        self.frames_sent = 0
        self.audio_frames_sent = 0
        self._written = 0  # samples queued since the start, flushed ones included
        self._sent = 0  # samples sent or flushed since the start
        self._playouts: collections.deque[Playout] = collections.deque()
        self.paused = False
        # Pacing health: the longest wall-clock gap between two frames handed out, and how many
        # came over LATE_GAP_MS after the one before (the receiver's jitter buffer then runs dry).
        self.worst_gap_ms = 0.0
        self.late_frames = 0
        self._last_frame_at: float | None = None
        self.on_sent: Callable[[np.ndarray, int], None] | None = None  # each frame handed out, and the rate

    @property
    def queued_ms(self) -> float:
        return 1000.0 * self._queued / self.sample_rate

    def write(self, pcm: np.ndarray, sample_rate: int) -> Playout:
        pcm = np.ascontiguousarray(to_float(pcm)).reshape(-1)
        if sample_rate != self.sample_rate:
            stream = self._resamplers.get(sample_rate)
            if stream is None:
                stream = self._resamplers[sample_rate] = soxr.ResampleStream(
                    sample_rate, self.sample_rate, 1, dtype="float32"
                )
            pcm = stream.resample_chunk(pcm)
        playout = Playout(self._written, self._written)
        self._playouts.append(playout)
        self._append(pcm)
        return playout

    def _append(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._chunks.append(pcm)
            self._queued += len(pcm)
            self._written += len(pcm)
            if self._playouts:  # a resampler's held-back tail belongs to the latest write
                self._playouts[-1].end = self._written

    def _drain_resamplers(self) -> None:
        # A resampler holds back a few ms of filter delay; when the queue runs dry the stream has
        # paused, so release that tail now instead of on the next write.
        for stream in self._resamplers.values():
            self._append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self._resamplers.clear()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def flush(self) -> int:
        """Drop everything queued and end a pause; returns the number of samples dropped."""
        self.paused = False
        dropped = self._queued
        self._chunks.clear()
        self._queued = 0
        self._resamplers.clear()
        self._sent = self._written
        for playout in self._playouts:
            playout.flushed = True
            playout.finished.set()
        self._playouts.clear()
        return dropped

    def _advance(self, samples: int) -> None:
        self._sent += samples
        while self._playouts:
            playout = self._playouts[0]
            if self._sent > playout.start:
                playout.started.set()
            holding = len(self._playouts) == 1 and self._resamplers  # its tail is still in a resampler
            if self._sent < playout.end or holding:
                return
            playout.finished.set()
            self._playouts.popleft()

    def next_frame(self) -> np.ndarray:
        """Exactly one frame of int16 samples."""
        frame = self._frame()
        if self.on_sent is not None:
            self.on_sent(frame, self.sample_rate)
        return frame

    def _frame(self) -> np.ndarray:
        now = time.monotonic()
        if self._last_frame_at is not None:
            gap_ms = (now - self._last_frame_at) * 1000.0
            self.worst_gap_ms = max(self.worst_gap_ms, gap_ms)
            self.late_frames += gap_ms > LATE_GAP_MS
        self._last_frame_at = now
        self.frames_sent += 1
        if self.paused:
            return np.zeros(self.frame_samples, dtype=np.int16)
        if self._queued < self.frame_samples and self._resamplers:
            self._drain_resamplers()
        out = np.zeros(self.frame_samples, dtype=np.float32)
        filled = 0
        while filled < self.frame_samples and self._chunks:
            chunk = self._chunks[0]
            take = min(len(chunk), self.frame_samples - filled)
            out[filled : filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[take:]
        self._queued -= filled
        if filled:
            self.audio_frames_sent += 1
        self._advance(filled)
        return float_to_int16(out)


class PlaybackTracker:
    """Owns what is known of how much of the current reply the client has played: the audio frames
    sent since the reply began, the position the client reports (`playback.position`, a truncate),
    and the buffer assumed at a client that reports none (`buffer_ms`). Answers `heard_ms()`."""

    def __init__(self, output: PacedOutput, buffer_ms: float = 0.0) -> None:
        self._output = output
        self.buffer_ms = buffer_ms
        self.response_id: str | None = None
        self._base = 0  # the output's audio frames sent when the reply began
        self._position_ms: float | None = None

    def begin(self, response_id: str) -> None:
        """A reply starts to play: every audio frame sent from now on is its."""
        self.response_id = response_id
        self._base = self._output.audio_frames_sent
        self._position_ms = None

    def report(self, position_ms: float, response_id: str | None = None) -> None:
        """The client has played `position_ms` of the reply (`response_id`, or the current one)."""
        if response_id is None or response_id == self.response_id:
            self._position_ms = position_ms

    @property
    def sent_ms(self) -> float:
        return float((self._output.audio_frames_sent - self._base) * FRAME_MS)

    def heard_ms(self) -> float:
        """What the user has heard of the current reply: what the client reports it played (never
        more than was sent), or else what was sent less the buffer assumed."""
        sent = self.sent_ms
        if self._position_ms is not None:
            return min(self._position_ms, sent)
        return max(0.0, sent - self.buffer_ms)
