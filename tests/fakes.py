"""Deterministic stand-ins for the models, for controller tests: scripted VAD, cued LM, fixed decoder."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import numpy as np
from aiohttp import web

from models.base import Message, SpeechChunk
from streaming_tokenizer.base import PartialCallback, StableCallback, UtteranceInput
from testkit.notifier import Notifier

VOICED = np.full(320, 1000, dtype=np.int16)
SILENT = np.zeros(320, dtype=np.int16)


class ScriptedDetector:
    """Speech wherever the frame is non-zero: the test's frames are the VAD timeline."""

    def probability(self, frame: np.ndarray) -> float:
        return 1.0 if np.any(frame) else 0.0

    def reset(self) -> None:
        pass


class CountingTokenizer:
    """Transcribes an utterance as the number of frames it was given."""

    def __init__(self, notifier: Notifier, audio_tokens: bool = False) -> None:
        self.audio_tokens = audio_tokens  # answer like Step-Audio's tokenizer: LM content, no text
        # When set: the transcript comes later, once this event is set (a transcript made beside
        # the reply, as the stepaudio profile's is).
        self.transcript_gate: asyncio.Event | None = None
        self.transcript: str | None = None  # when set: every utterance is transcribed as this
        self.transcribing = 0
        self.frames = 0
        self.finalized: list[int] = []
        self.closed = False
        self.on_stable: StableCallback | None = None  # the utterance's, for a test to say its start is stable
        self._notifier = notifier

    def begin(
        self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None, on_stable: StableCallback | None = None
    ) -> None:
        self.frames = len(frames)
        self.on_stable = on_stable

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self.frames += 1

    async def finalize(self) -> UtteranceInput:
        self.finalized.append(self.frames)
        self._notifier.notify()
        if self.audio_tokens or self.transcript_gate is not None:
            content = "".join(f"<audio_{i}>" for i in range(self.frames))
            gate, frames = self.transcript_gate, self.frames
            if gate is None:
                return UtteranceInput("", content)

            async def transcribe() -> str:
                self.transcribing += 1
                self._notifier.notify()
                await gate.wait()
                return f"utterance of {frames} frames"

            return UtteranceInput("", content, transcribe)
        return UtteranceInput(self.transcript if self.transcript is not None else f"utterance of {self.frames} frames")

    async def aclose(self) -> None:
        self.closed = True


class CuedLM:
    """Yields `reply` word by word; with `hold`, each word waits for a cue (release())."""

    calls_tools = False

    def __init__(self, notifier: Notifier, reply: str = "Sure. Here is the answer you asked for.", hold: bool = False):
        self.reply = reply
        self.hold = hold
        self.calls: list[list[Message]] = []
        self.cancelled = 0
        self.yielded = 0
        self._cues: asyncio.Queue[None] = asyncio.Queue()
        self._notifier = notifier

    def release(self, words: int = 1000) -> None:
        for _ in range(words):
            self._cues.put_nowait(None)

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncIterator[str]:
        self.calls.append(messages)
        self._notifier.notify()
        try:
            for i, word in enumerate(self.reply.split()):
                if self.hold:
                    await self._cues.get()
                self.yielded += 1
                self._notifier.notify()
                yield (" " if i else "") + word
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            self._notifier.notify()
            raise


class GatedPromptCache:
    """A prompt cache that records what it is asked to read ahead and finishes once `gate` is set."""

    def __init__(self, notifier: Notifier) -> None:
        self.prefills: list[list[Message]] = []
        self.done = 0
        self.gate = asyncio.Event()
        self._notifier = notifier

    async def prefill(self, messages: list[Message]) -> None:
        self.prefills.append(messages)
        self._notifier.notify()
        await self.gate.wait()
        self.done += 1
        self._notifier.notify()


class ToneDecoder:
    """`ms_per_word` of a constant tone at 16 kHz for each word of text, one chunk per delta."""

    def __init__(self, notifier: Notifier, ms_per_word: int = 200) -> None:
        self.ms_per_word = ms_per_word
        self.chunks = 0
        self._notifier = notifier

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncIterator[SpeechChunk]:
        async for delta in text:
            words = len(delta.split())
            pcm = np.full(16 * self.ms_per_word * words, 0.25, dtype=np.float32)
            self.chunks += 1
            self._notifier.notify()
            yield SpeechChunk(pcm, 16000, delta)


async def serve(endpoint: Any) -> web.AppRunner:
    """An OpenAI-compatible chat endpoint on 127.0.0.1: `endpoint.handle` answers
    `POST /v1/chat/completions`; `endpoint.url` is set to the base URL. Clean the runner up."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    endpoint.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
    return runner
