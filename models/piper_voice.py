"""piper's own process: loads the voice and turns each piece of text it is sent into PCM.

    python -m models.piper_voice MODEL CONFIG [--threads N] [--busy-wait]

It reads requests on stdin and writes replies on stdout, each a frame (`read_frame`): a request's
payload is UTF-8 text; a reply is kind `r` (loaded; the payload is the sample rate), `a` (float32
PCM) or `e` (an error message). Started by `piper_tts.PiperProcess`, which owns it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from runtime.workers import lower_priority

HEADER = struct.Struct("<cI")  # kind, payload length
READY, AUDIO, ERROR, TEXT = b"r", b"a", b"e", b"t"


def write_frame(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(HEADER.pack(kind, len(payload)) + payload)
    out.flush()


def read_frame(source: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next frame, or None when the other side has closed the pipe."""
    header = source.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    kind, size = HEADER.unpack(header)
    payload = source.read(size)
    return (kind, payload) if len(payload) == size else None


class ArenaReturningSession:
    """piper's ONNX Runtime session, each run of which gives its arena's memory back as it ends.

    The arena otherwise keeps what its largest run took, and a run laid out differently can take
    more: in an hour of calls the server stepped up by 100 MB and more, a few times, for good.
    """

    def __init__(self, session) -> None:
        import onnxruntime

        self._session = session
        self._options = onnxruntime.RunOptions()
        self._options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, output_names, feed):
        return self._session.run(output_names, feed, self._options)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class Voice:
    """Owns the piper voice, bounded to `threads` threads that sleep between runs unless `busy_wait`."""

    def __init__(self, model: Path, config: Path, volume: float, threads: int = 1, busy_wait: bool = False) -> None:
        import onnxruntime
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig

        from models.espeak_phonemes import install

        install()  # piper's own espeak-ng binding leaks ~1.6 KB a piece
        # PiperVoice.load() gives ONNX Runtime every core, spinning while idle: bounded here instead.
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not busy_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # A memory pattern is planned and kept for each new input shape, and every piece's phoneme
        # count is one: +16 MB in 595 pieces, still climbing; without patterns +3 MB, as fast.
        options.enable_mem_pattern = False
        session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self._voice = PiperVoice(
            config=PiperConfig.from_dict(json.loads(config.read_text(encoding="utf-8"))),
            session=ArenaReturningSession(session),
        )
        self._syn_config = SynthesisConfig(volume=volume)
        self.sample_rate = self._voice.config.sample_rate

    def speak(self, text: str) -> np.ndarray:
        parts = [chunk.audio_float_array for chunk in self._voice.synthesize(text, self._syn_config)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)


def serve(voice: Voice, requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until the parent closes the pipe."""
    while (frame := read_frame(requests)) is not None:
        try:
            reply = (AUDIO, voice.speak(frame[1].decode("utf-8")).tobytes())
        except Exception as exc:  # the piece fails, the voice goes on
            reply = (ERROR, f"{type(exc).__name__}: {exc}".encode())
        write_frame(replies, *reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.piper_voice")
    parser.add_argument("model", type=Path)
    parser.add_argument("config", type=Path)
    parser.add_argument("--volume", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--busy-wait", action="store_true")
    args = parser.parse_args(argv)
    # The parent stops it by closing stdin; a Ctrl-C in the terminal is the parent's to handle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lower_priority()  # before ONNX Runtime starts its threads, which inherit it
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print must not land among the replies
    try:
        voice = Voice(args.model, args.config, args.volume, args.threads, args.busy_wait)
    except Exception as exc:
        write_frame(replies, ERROR, f"{type(exc).__name__}: {exc}".encode())
        return 1
    write_frame(replies, READY, str(voice.sample_rate).encode())
    serve(voice, sys.stdin.buffer, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
