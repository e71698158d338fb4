"""Opus over a lossy path, as a browser does it: the sender adds in-band FEC, the receiver gives up
on a missing packet as soon as the next ones are in and fills its place from FEC or concealment.

aiortc has neither: its audio jitter buffer waits for a lost packet until 16 more have come (each
loss costs 320 ms, most of it never caught up), its decoder skips the hole, and its encoder sends
no FEC. It has no settings for these either, so `install()` swaps its codec factories (the
decoder runs in aiortc's own thread, which asks a module-level factory) and
`hold_received_frames()` swaps one receiver's jitter buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fractions
from pathlib import Path
from typing import Any

import aiortc.codecs
import aiortc.rtcrtpreceiver
import aiortc.rtcrtpsender
import av
import numpy as np
from aiortc import RTCRtpReceiver
from aiortc.codecs import get_decoder, get_encoder
from aiortc.codecs.base import Decoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from av import AudioFrame

RATE = 48000
TIME_BASE = fractions.Fraction(1, RATE)
PACKET_SAMPLES = 960  # 20 ms: what browsers and aiortc send
MAX_CONCEALED_SAMPLES = 10 * PACKET_SAMPLES  # a longer hole is a pause of the sender, not a loss
_PLC_CHUNK = 5760  # libopus conceals at most 120 ms a call
EXPECTED_LOSS_PERCENT = 10  # what the encoder spends FEC bits for
OPUS_FMTP = {"minptime": 10, "useinbandfec": 1}  # as browsers describe their Opus


def _load_libopus() -> ctypes.CDLL:
    """The libopus that PyAV ships (and aiortc decodes with), else the system's."""
    bundled = sorted((Path(av.__file__).parent.parent / "av.libs").glob("libopus*.so*"))
    name = str(bundled[0]) if bundled else ctypes.util.find_library("opus")
    if name is None:
        raise RuntimeError("libopus not found: neither in PyAV's wheel (av.libs) nor on the system")
    lib = ctypes.CDLL(name)
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_int16), ctypes.c_int, ctypes.c_int,
    ]
    return lib


_LIBOPUS = _load_libopus()


class ConcealingOpusDecoder(Decoder):
    """One stream's libopus decoder (mono out). Owns the decoder state. A hole in the timestamps
    up to MAX_CONCEALED_SAMPLES long is filled, so the output keeps the stream's timing: its last
    20 ms from the next packet's FEC where the sender added it, the rest by libopus concealment."""

    def __init__(self) -> None:
        error = ctypes.c_int()
        self._state = _LIBOPUS.opus_decoder_create(RATE, 1, ctypes.byref(error))
        if error.value != 0 or not self._state:
            raise RuntimeError(f"opus_decoder_create failed ({error.value})")
        self._buffer = np.zeros(_PLC_CHUNK, dtype=np.int16)
        self._next: int | None = None  # the timestamp the next packet should have
        self.concealed_samples = 0

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            _LIBOPUS.opus_decoder_destroy(self._state)
            self._state = None

    def decode(self, encoded_frame: JitterFrame) -> list[AudioFrame]:
        data, timestamp = encoded_frame.data, encoded_frame.timestamp
        frames: list[AudioFrame] = []
        if self._next is not None:
            missing = (timestamp - self._next) & 0xFFFFFFFF  # RTP timestamps wrap at 2^32
            if 0 < missing <= MAX_CONCEALED_SAMPLES and missing % 120 == 0:  # 2.5 ms steps, as libopus needs
                frames += self._conceal(data, self._next, missing)
        pcm = self._decode(data, _PLC_CHUNK, fec=False)
        frames += self._frames(pcm, timestamp)
        self._next = (timestamp + len(pcm)) & 0xFFFFFFFF
        return frames

    def _conceal(self, following: bytes, start: int, samples: int) -> list[AudioFrame]:
        self.concealed_samples += samples
        pcm = []
        left = samples
        while left > _PLC_CHUNK:  # beyond what one call conceals: plain concealment first
            pcm.append(self._decode(None, _PLC_CHUNK, fec=False))
            left -= _PLC_CHUNK
        pcm.append(self._decode(following, left, fec=True))  # libopus conceals all but the FEC part
        return self._frames(np.concatenate(pcm), start)

    def _decode(self, data: bytes | None, samples: int, fec: bool) -> np.ndarray:
        out = self._buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))
        count = _LIBOPUS.opus_decode(self._state, data, len(data) if data else 0, out, samples, int(fec))
        if count < 0:
            raise av.error.InvalidDataError(-1, f"opus_decode failed ({count})")  # aiortc logs it, keeps going
        return self._buffer[:count].copy()

    @staticmethod
    def _frames(pcm: np.ndarray, timestamp: int) -> list[AudioFrame]:
        """20 ms frames (receivers count and time them one by one), the last possibly shorter."""
        frames = []
        for offset in range(0, len(pcm), PACKET_SAMPLES):
            piece = pcm[offset : offset + PACKET_SAMPLES]
            frame = AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = RATE
            frame.pts = (timestamp + offset) & 0xFFFFFFFF
            frame.time_base = TIME_BASE
            frames.append(frame)
        return frames


class FecOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder with in-band FEC on, as browsers send: each packet carries a coarse
    copy of the one before, so a single lost packet is rebuilt from the next."""

    def __init__(self) -> None:
        super().__init__()
        self.codec.options = {**self.codec.options, "fec": "1", "packet_loss": str(EXPECTED_LOSS_PERCENT)}


def _codec_decoder(codec: Any) -> Decoder:
    return ConcealingOpusDecoder() if codec.name.lower() == "opus" else get_decoder(codec)


def _codec_encoder(codec: Any) -> Any:
    return FecOpusEncoder() if codec.name.lower() == "opus" else get_encoder(codec)


def install() -> None:
    """Make every aiortc peer of this process send FEC, decode with concealment, and say in its
    offers and answers that it takes FEC (`useinbandfec=1`): a browser sends FEC only to a peer
    that says so, and aiortc's descriptions say nothing."""
    aiortc.rtcrtpreceiver.get_decoder = _codec_decoder  # type: ignore[attr-defined]
    aiortc.rtcrtpsender.get_encoder = _codec_encoder  # type: ignore[attr-defined]
    for codec in aiortc.codecs.CODECS["audio"]:
        if codec.mimeType.lower() == "audio/opus":
            codec.parameters.update(OPUS_FMTP)


class AudioJitterBuffer:
    """Puts one stream's audio packets back in order, one packet per frame as Opus sends them.
    A packet is handed on once `prefetch` newer ones have come; a hole that many packets old is
    given up as lost (the decoder fills it), so a loss costs no more than the look-ahead."""

    def __init__(self, prefetch: int, capacity: int = 64) -> None:
        self.capacity = capacity
        self._prefetch = prefetch
        self._packets: dict[int, RtpPacket] = {}
        self._next: int | None = None  # the sequence number to hand on next
        self._newest = 0

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """The same contract as aiortc's JitterBuffer: (whether to send a PLI, a frame or None)."""
        seq = packet.sequence_number
        offset = None if self._next is None else _distance(seq, self._next)
        if offset is None or not -self.capacity <= offset < self.capacity:
            self._packets.clear()  # the first packet, or a jump (the sender restarted): follow it
            self._next = self._newest = seq
        elif offset < 0:
            return False, None  # too late: given up on or handed on already
        elif _distance(seq, self._newest) > 0:
            self._newest = seq
        self._packets[seq] = packet
        while _distance(self._newest, self._next) >= self._prefetch:
            ready = self._packets.pop(self._next, None)
            self._next = (self._next + 1) & 0xFFFF
            if ready is not None:
                return False, JitterFrame(data=ready._data, timestamp=ready.timestamp)  # type: ignore[attr-defined]
        return False, None


def _distance(seq: int, other: int) -> int:
    """How many packets `seq` is after `other` (negative: before), across the 16-bit wrap."""
    return ((seq - other + 0x8000) & 0xFFFF) - 0x8000


def hold_received_frames(receiver: RTCRtpReceiver, frames: int) -> None:
    """Make `receiver` hand on each audio packet once `frames` newer ones have come (aiortc: 4,
    and a lost one blocks it until 16 have), giving up on a missing one after as many."""
    receiver._RTCRtpReceiver__jitter_buffer = AudioJitterBuffer(prefetch=frames)  # type: ignore[attr-defined]
