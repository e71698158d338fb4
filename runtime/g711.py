"""G.711 mu-law, the telephone network's 8-bit audio (Twilio's media streams), to and from int16."""

from __future__ import annotations

import numpy as np

BIAS = 0x84
CLIP = 32635


def _decoded() -> np.ndarray:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS
    return np.where(code & 0x80, -magnitude, magnitude).astype(np.int16)


DECODED = _decoded()  # mu-law byte -> int16


def ulaw_to_int16(data: bytes) -> np.ndarray:
    return DECODED[np.frombuffer(data, dtype=np.uint8)]


def int16_to_ulaw(pcm: np.ndarray) -> bytes:
    # On 14 bits, as the reference coder (Sun's g711.c, which Python's audioop follows) works:
    # the shift floors a negative sample, and the clip and bias are the 14-bit ones, times 4.
    x = pcm.astype(np.int32) >> 2
    sign = np.where(x < 0, 0x80, 0)
    magnitude = (np.minimum(np.abs(x), CLIP >> 2) + (BIAS >> 2)) << 2
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()
