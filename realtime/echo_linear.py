"""A linear echo canceller of our own, for double-talk: AEC3's suppressor mutes a user who talks
over the agent at the echo's level (100-500 ms and more, measured), where a linear filter only
subtracts the echo it has learnt and leaves the user's voice whole, with what remains of the echo
known frame by frame."""

from __future__ import annotations

import collections

import numpy as np

from runtime.audio import AUDIBLE, FRAME_SAMPLES, power

PARTITIONS = 12  # the filter spans 12 frames (240 ms): the room's reverberation after the delay found
LEAD_FRAMES = 3  # and starts 3 frames (60 ms) before it: the delay is found to a frame, late or early
STEP = 0.5  # the adaptation's step, normalized per frequency (0.8 and more measured unstable on speech)
REGULARIZE = 0.1  # of the mean power: bins the reference hardly excites are not learnt from the user's voice
HISTORY_FRAMES = 150  # once the delay is found, the last 3 s are learnt from at once (18+ dB at once, measured)
REPLAY_FRAMES = 150  # once aligned, passes over the echo in the history, ~3 s in all (~40 ms of CPU, once)
MAX_REPLAYS = 3  # (more passes over a short history learnt its noise: worse, measured)
RATIO_FRAMES = 250  # what is left of the echo (residual / microphone), over the last 5 s it was audible
RATIO_PERCENTILE = 25  # its quarter-low: a user talking over most of those 5 s does not raise it
CONVERGED = 0.25  # the remainder judged frame by frame once the filter takes out 6 dB: the guard holds sound
# to MARGIN over what the filter leaves and never under half the echo it takes out, so a young filter lets no more
# echo through (replayed on 16 live calls: the same 25 leaks trusted from 13 dB down to 3 dB; live over /ws, 150 ms,
# 0 dB: 1 self-interruption in 22 replies, as from 13 dB), while the user's first barge-in of a call, ~1 s into the
# first echo where the filter takes out 6-11 dB, was lost from 13 dB on
LOST = 0.32  # and no longer once it takes out under 5 dB
MARGIN = 8.0  # sound 9 dB over what the filter leaves of the echo is more than echo
ESTIMATE_FRAMES = 3  # the echo's estimate: the loudest of the last 60 ms (a word's echo fades over a few frames)
FLOOR = 2 * FRAME_SAMPLES * PARTITIONS * AUDIBLE  # the normalization's least: the power of a span at AUDIBLE
JUDGED_FRAMES = 10  # it is judged from 200 ms of echo after it is placed (judging the history it learnt from with
# it trusted a filter that then let a greeting's echo through for a second, in one call of six)
MOSTLY_ECHO = 0.5  # frames whose echo, as the filter has learnt it, is over half of what was heard
COMPARED_FRAMES = 8  # the two filters are compared over the last 160 ms
BETTER = 0.9  # the learning one is kept once it leaves 1.5 dB less than the one in use
ECHO_ALONE = 0.125  # and leaves under 9 dB of what was heard: over a user's voice (double-talk) it does not
WORSE = 4.0  # and starts over from the one in use once it leaves 6 dB more (it learnt a user's voice)


class LinearEcho:
    """Owns a partitioned-block frequency-domain adaptive filter (one block a 20 ms frame) from
    the reference (`sent()`, 16 kHz) to the microphone (`cancel()`), aligned by the delay that
    EchoDelay finds (`align()`), and what it knows of its own work: how much of the echo it
    leaves (`converged`), and how loud the echo it took out of the last frame was (`remainder`:
    what may be left of it). Two filters of that shape: one learns from every frame the agent is
    audible in (from the other's weights each time it becomes audible again), the other, whose
    output is used, takes its weights only once they leave less of the echo over the last 160 ms,
    so a user talking over the agent does not teach it their voice."""

    def __init__(self) -> None:
        bins = FRAME_SAMPLES + 1
        self._spectra = np.zeros((PARTITIONS, bins), dtype=np.complex128)  # the reference, newest first
        self._weights = np.zeros((PARTITIONS, bins), dtype=np.complex128)  # in use
        self._learning = np.zeros((PARTITIONS, bins), dtype=np.complex128)
        self._bin_power = np.zeros(bins)
        self._previous = np.zeros(FRAME_SAMPLES)
        self._sent: collections.deque[np.ndarray] = collections.deque(maxlen=HISTORY_FRAMES + 64)
        self._heard: collections.deque[np.ndarray] = collections.deque(maxlen=HISTORY_FRAMES)
        self._sent_count = 0
        self._heard_count = 0
        self._offset: int | None = None  # heard frame n holds the echo of sent frame n + offset
        self._converged = False
        self._ratios: collections.deque[float] = collections.deque(maxlen=RATIO_FRAMES)
        self._estimates: collections.deque[float] = collections.deque(maxlen=ESTIMATE_FRAMES)
        self._levels: collections.deque[float] = collections.deque(maxlen=PARTITIONS)  # of the reference the filter spans
        self._left: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=COMPARED_FRAMES)  # (in use, learning, heard)
        self._spanned = False  # whether the agent was audible in the span the filter covered at the last frame

    def sent(self, frame: np.ndarray) -> None:
        """A frame of the reference (float, 16 kHz, one per frame sent)."""
        self._sent.append(np.asarray(frame, dtype=np.float64))
        self._sent_count += 1

    def align(self, delay_frames: int) -> None:
        """The echo comes back `delay_frames` after it was sent, counted from now: the filter
        starts over from the last seconds heard."""
        # (No further ahead than the newest frame sent: the filter would be fed only silence.)
        self._offset = self._sent_count - 1 - self._heard_count - delay_frames + min(LEAD_FRAMES, delay_frames)
        self._learning[:] = 0
        self._ratios.clear()
        self._left.clear()
        self._converged = False
        self._replay()
        self._weights = self._learning.copy()

    def _replay(self) -> None:
        """Learn from the echo heard so far, from its start: a few passes over a short one (a
        call's first: the delay is found within a second of it), about REPLAY_FRAMES frames in all."""
        first = self._heard_count - len(self._heard)
        echoed = [power(self._reference(first + index)) > AUDIBLE for index in range(len(self._heard))]
        start = max(0, echoed.index(True) - PARTITIONS) if True in echoed else len(echoed)
        for _ in range(min(MAX_REPLAYS, -(-REPLAY_FRAMES // max(1, len(echoed) - start)))):
            self._spectra[:] = 0
            self._previous[:] = 0
            self._levels.clear()
            for index in range(start, len(self._heard)):
                self._shift(self._reference(first + index))
                self._adapt(self._heard[index] - self._echo(self._learning))

    @property
    def converged(self) -> bool:
        """Whether the filter takes out CONVERGED of the echo (judged again each frame: it is lost
        only at LOST, so it does not come and go at every frame around the line)."""
        return self._converged

    @property
    def left_db(self) -> float:
        """What the filter leaves of the echo, in dB (0 until it has learnt)."""
        return 10 * float(np.log10(max(self._ratio(), 1e-9)))

    @property
    def remainder(self) -> float:
        """The power of what may be left of the echo in the last residual."""
        return min(0.5, MARGIN * self._ratio()) * max(self._estimates, default=0.0)

    def cancel(self, frame: np.ndarray) -> np.ndarray:
        """The microphone's frame (16 kHz) less the echo learnt (float; the frame itself until
        the delay is found); the learning filter learns from it while the agent is audible."""
        heard = np.asarray(frame, dtype=np.float64)
        self._heard.append(heard)
        self._heard_count += 1
        if self._offset is None:
            return heard
        self._shift(self._reference(self._heard_count - 1))
        residual = heard - self._echo(self._weights)
        echo, left, whole = power(heard - residual), power(residual), power(heard)
        self._estimates.append(echo)
        spanned = max(self._levels) > AUDIBLE
        if spanned and not self._spanned:
            # The agent audible again: the learning filter starts from the one in use. As the
            # last reply's echo faded it learnt from whatever came (a user answering at once:
            # their voice against a quiet reference); a few frames into the next reply it then
            # won the comparison and left more than the microphone heard (live, over /ws: the
            # agent took its own echo for the user going on).
            self._learning = self._weights.copy()
            self._left.clear()
        self._spanned = spanned
        if spanned:
            learnt = heard - self._echo(self._learning)
            self._left.append((left, power(learnt), whole))
            self._adapt(learnt)
            self._compare()
            if echo > MOSTLY_ECHO * whole:  # judged on the echo alone, not on a user talking over it
                self._ratios.append(left / (whole + 1.0))
            self._converged = len(self._ratios) >= JUDGED_FRAMES and self._ratio() < (
                LOST if self._converged else CONVERGED
            )
        return residual

    def _compare(self) -> None:
        """The filter in use takes the learning one's weights once they do better on echo alone; the learning
        one starts over from the one in use once it does far worse."""
        if len(self._left) < COMPARED_FRAMES:
            return
        in_use, learning, heard = (sum(values) for values in zip(*self._left))
        if learning < BETTER * in_use and learning < ECHO_ALONE * heard:
            self._weights = self._learning.copy()
            self._left.clear()
        elif learning > WORSE * in_use:
            self._learning = self._weights.copy()
            self._left.clear()

    def _ratio(self) -> float:
        """What the filter in use leaves of the echo (residual / microphone, the quarter-low)."""
        return float(np.percentile(self._ratios, RATIO_PERCENTILE)) if self._ratios else 1.0

    def _reference(self, heard_index: int) -> np.ndarray:
        assert self._offset is not None
        position = heard_index + self._offset - (self._sent_count - len(self._sent))
        return self._sent[position] if 0 <= position < len(self._sent) else np.zeros(FRAME_SAMPLES)

    def _shift(self, reference: np.ndarray) -> None:
        self._spectra[1:] = self._spectra[:-1]
        self._spectra[0] = np.fft.rfft(np.concatenate([self._previous, reference]))
        self._previous = reference
        self._levels.append(power(reference))
        self._bin_power = 0.5 * self._bin_power + 0.5 * np.sum(np.abs(self._spectra) ** 2, axis=0)

    def _echo(self, weights: np.ndarray) -> np.ndarray:
        return np.fft.irfft(np.sum(weights * self._spectra, axis=0))[FRAME_SAMPLES:]

    def _adapt(self, residual: np.ndarray) -> None:
        error = np.fft.rfft(np.concatenate([np.zeros(FRAME_SAMPLES), residual]))
        normal = self._bin_power / 2 + REGULARIZE * float(np.mean(self._bin_power)) + FLOOR
        self._learning += STEP * np.conj(self._spectra) * error / normal
        # Each partition's filter kept to one frame's length (a linear, not a circular, convolution).
        taps = np.fft.irfft(self._learning, axis=1)
        taps[:, FRAME_SAMPLES:] = 0
        self._learning = np.fft.rfft(taps, axis=1)
