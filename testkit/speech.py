"""Speech for tests and bench clips: espeak-ng synthesis, and 16-bit WAV files read and written."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Sequence

import numpy as np
import soxr


def espeak(text: str, rate: int = 16000, options: Sequence[str] = ()) -> np.ndarray:
    """Mono float32 speech at `rate`; `options` are espeak-ng's (a voice, speed, pitch); needs
    the Debian package espeak-ng."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", *options, "-w", str(path), text], check=True, timeout=60)
        pcm, native_rate = read_wav(path)
    return pcm if native_rate == rate else soxr.resample(pcm, native_rate, rate).astype(np.float32)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 and the rate of a 16-bit PCM WAV file (channels averaged)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: 16-bit PCM WAV expected")
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
        data = data.reshape(-1, wav.getnchannels()).mean(axis=1)
        return data, wav.getframerate()


def write_wav(path: Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
