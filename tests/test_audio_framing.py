"""Unit: input framing to 16 kHz mono frames and the paced output queue."""

from __future__ import annotations

import fractions
import math

import aiortc.rtp
import numpy as np
import pytest
import soxr
from av import AudioFrame

from realtime import audio_level
from realtime.audio import InputFramer, WindowedUpsampler, frame_to_mono
from realtime.audio_level import audio_level_dbov
from realtime.output import PacedOutput
from runtime.audio import FRAME_SAMPLES
from tests.signals import best_alignment

pytestmark = pytest.mark.unit


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_identity_rate_keeps_every_sample_across_uneven_chunks():
    rng = np.random.default_rng(1)
    pcm = (rng.integers(-20000, 20000, 16000 * 3) / 32768).astype(np.float32)
    framer = InputFramer()
    frames, pos = [], 0
    while pos < len(pcm):
        size = int(rng.integers(1, 700))
        frames += framer.push(pcm[pos : pos + size], 16000)
        pos += size
    out = np.concatenate(frames)
    assert all(len(f) == FRAME_SAMPLES and f.dtype == np.int16 for f in frames)
    assert len(out) == len(pcm) // FRAME_SAMPLES * FRAME_SAMPLES
    expected = np.round(pcm[: len(out)] * 32767).astype(np.int16)
    assert np.array_equal(out, expected)


def test_48k_to_16k_has_no_drift_over_ten_minutes():
    framer = InputFramer()
    chunk = sine(440, 0.02, 48000)  # 20 ms, a whole number of cycles
    frames = 0
    for _ in range(10 * 60 * 50):
        frames += len(framer.push(chunk, 48000))
    produced = frames * FRAME_SAMPLES
    expected = 10 * 60 * 16000
    # Only the resampler's fixed filter delay (plus one partial frame) may be missing: never growing.
    assert expected - 2 * FRAME_SAMPLES <= produced <= expected


def test_48k_stereo_frames_become_continuous_16k_mono():
    rate = 48000
    tone = sine(1000, 1.0, rate)
    framer = InputFramer()
    out = []
    for i in range(0, len(tone), 960):
        stereo = np.repeat(tone[i : i + 960], 2).reshape(1, -1)
        frame = AudioFrame.from_ndarray((stereo * 32767).astype(np.int16), format="s16", layout="stereo")
        frame.sample_rate = rate
        frame.time_base = fractions.Fraction(1, rate)
        out += framer.push(frame_to_mono(frame), frame.sample_rate)
    pcm = np.concatenate(out).astype(np.float32) / 32768
    reference = sine(1000, 0.5, 16000)
    score, _ = best_alignment(reference, pcm)
    assert score > 0.999
    # No click at any frame boundary: a 1 kHz sine at 16 kHz moves at most 0.2 per sample.
    steady = pcm[400:-400]
    assert np.max(np.abs(np.diff(steady))) < 0.2


def test_planar_frames_are_downmixed():
    left = np.full(480, 0.5, dtype=np.float32)
    right = np.zeros(480, dtype=np.float32)
    frame = AudioFrame.from_ndarray(np.stack([left, right]), format="fltp", layout="stereo")
    frame.sample_rate = 48000
    assert np.allclose(frame_to_mono(frame), 0.25)


def test_output_cuts_frames_pads_silence_and_counts():
    out = PacedOutput(48000)
    out.write(np.full(960 + 480, 0.5, dtype=np.float32), 48000)
    assert out.queued_ms == pytest.approx(30)
    first, second, third = out.next_frame(), out.next_frame(), out.next_frame()
    assert len(first) == 960 and np.all(first == 16384)
    assert np.all(second[:480] == 16384) and np.all(second[480:] == 0)
    assert np.all(third == 0)
    assert (out.frames_sent, out.audio_frames_sent) == (3, 2)


def test_output_resamples_any_rate_without_losing_the_tail():
    out = PacedOutput(48000)
    out.write(sine(300, 1.0, 16000), 16000)
    out.write((sine(300, 1.0, 22050) * 32767).astype(np.int16), 22050)
    frames = [out.next_frame() for _ in range(110)]
    voiced = sum(1 for f in frames if np.abs(f).max() > 0)
    # 2 s of audio = 100 frames at 48 kHz, give or take the resamplers' filter edges.
    assert 99 <= voiced <= 101


def test_flush_makes_the_next_frame_silent_and_reports_what_it_dropped():
    out = PacedOutput(48000)
    out.write(sine(200, 2.0, 24000), 24000)
    assert np.abs(out.next_frame()).max() > 0
    dropped = out.flush()
    assert dropped > 48000  # most of the 2 s were still queued
    assert out.queued_ms == 0
    assert np.all(out.next_frame() == 0)
    out.write(sine(200, 0.1, 48000), 48000)
    assert np.abs(out.next_frame()).max() > 0


async def test_pause_silences_the_next_frame_and_keeps_every_sample_for_resume():
    out = PacedOutput(48000)
    playout = out.write(np.full(3 * 960, 0.5, dtype=np.float32), 48000)
    assert np.all(out.next_frame() == 16384)
    out.pause()
    assert all(np.all(out.next_frame() == 0) for _ in range(5))
    assert out.queued_ms == pytest.approx(40) and not playout.finished.is_set()
    out.resume()
    assert np.all(out.next_frame() == 16384) and np.all(out.next_frame() == 16384)
    assert playout.finished.is_set() and not playout.flushed
    assert (out.frames_sent, out.audio_frames_sent) == (8, 3)
    out.write(np.full(960, 0.5, dtype=np.float32), 48000)
    out.pause()
    out.flush()  # a flush ends the pause
    out.write(np.full(960, 0.5, dtype=np.float32), 48000)
    assert np.all(out.next_frame() == 16384)


def test_the_playback_tracker_knows_what_the_client_heard_of_the_current_reply():
    from realtime.output import PlaybackTracker

    out = PacedOutput(16000)
    playback = PlaybackTracker(out, buffer_ms=120)
    out.write(np.full(16000, 0.1, dtype=np.float32), 16000)
    for _ in range(10):
        out.next_frame()  # a reply before this one
    playback.begin("resp_a")
    for _ in range(25):
        out.next_frame()
    assert playback.sent_ms == 500 and playback.heard_ms() == 380  # sent, less the client's buffer
    playback.report(200.0, "resp_other")  # another reply's position changes nothing
    assert playback.heard_ms() == 380
    playback.report(450.0, "resp_a")
    assert playback.heard_ms() == 450
    playback.report(900.0)  # never more than was sent
    assert playback.heard_ms() == 500
    playback.begin("resp_b")
    assert (playback.sent_ms, playback.heard_ms()) == (0, 0)


def _level_by_the_rfc(frame: AudioFrame) -> int:
    """RFC 6465's Appendix A, one sample at a time (what aiortc's own loop does)."""
    values = np.frombuffer(bytes(frame.planes[0]), dtype=np.int16).tolist()
    rms = math.sqrt(sum(v * v for v in values) / (frame.samples * 32767 * 32767))
    return -127 if rms == 0 else round(min(0.0, max(-127.0, 20 * math.log10(rms))))


@pytest.mark.parametrize("layout, amplitude", [("mono", 0), ("mono", 3), ("mono", 1000), ("mono", 32767), ("stereo", 8000)])
def test_the_sent_audio_level_is_the_rfcs(layout: str, amplitude: int):
    channels = 2 if layout == "stereo" else 1
    rng = np.random.default_rng(amplitude)
    samples = rng.integers(-amplitude, amplitude + 1, size=(1, 960 * channels)).astype(np.int16)
    frame = AudioFrame.from_ndarray(samples, format="s16", layout=layout)
    assert audio_level_dbov(frame) == _level_by_the_rfc(frame)
    audio_level.install()
    assert aiortc.rtp.compute_audio_level_dbov is audio_level_dbov  # what aiortc's sender calls


@pytest.mark.parametrize("rate", [8000, 48000])
def test_each_chunk_reaches_the_server_within_a_frame_of_arriving(rate):
    """A phone's 8 kHz as much as a browser's 48 kHz: what came in goes out as frames at once, not
    held back in the resampler's blocks."""
    framer = InputFramer()
    t = np.arange(rate * 2) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    chunk = rate // 50
    out = np.cumsum([len(framer.push(tone[i : i + chunk], rate)) for i in range(0, len(tone), chunk)])
    behind = np.arange(1, len(out) + 1) - out
    # Never more behind than the frame being filled and one in the resampler (8 kHz at soxr's high
    # quality was up to 5 behind: its blocks of ~100 ms).
    assert behind.max() <= 2, behind


def test_a_phone_s_8khz_is_upsampled_as_the_whole_signal_would_be():
    """In chunks of any size, the windowed upsampler's output is the high-quality resampling of the
    whole signal, one look-ahead behind."""
    x = (np.random.default_rng(3).standard_normal(8000 * 3) * 0.1).astype(np.float32)
    upsampler, out, at = WindowedUpsampler(8000), [], 0
    for size in [160, 1, 7, 333, 160, 2000, 80] * 20:
        out.append(upsampler.resample_chunk(x[at : at + size]))
        at += size
    out = np.concatenate(out)
    whole = soxr.resample(x, 8000, 16000, quality="HQ")
    assert len(out) == 2 * (min(at, len(x)) - WindowedUpsampler.LOOKAHEAD)
    assert np.max(np.abs(out - whole[: len(out)])) < 1e-5
