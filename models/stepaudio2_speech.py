"""Step-Audio 2's replies as speech: the audio tokens among the ids the LM writes, streamed through
token2wav in the voice of the prompt, each piece of audio labelled with the text and ids it speaks."""

from __future__ import annotations

from typing import AsyncGenerator, AsyncIterator

from models.base import ModelIds, SpeechChunk
from models.stepaudio2_input import AUDIO_TOKEN_BASE
from models.stepaudio2_token2wav import SAMPLE_RATE, Token2Wav, Voice
from runtime.workers import ModelWorker

SPEECH_TOKENS = 6561  # CosyVoice2's; the model's higher audio ids are padding, never spoken


def speech_tokens(ids: tuple[int, ...]) -> list[int]:
    """The spoken audio tokens among a reply's ids, in CosyVoice2's numbering."""
    return [i - AUDIO_TOKEN_BASE for i in ids if 0 <= i - AUDIO_TOKEN_BASE < SPEECH_TOKENS]


class StepAudio2Speech:
    """Owns token2wav's use as the SpeechDecoder: one stream per reply in `worker`, in `voice`.
    Text that comes with no ids (a filler said while a function runs) is shown, not spoken: the
    model speaks only its own tokens."""

    def __init__(self, token2wav: Token2Wav, voice: Voice, worker: ModelWorker) -> None:
        self.token2wav, self.voice, self.worker = token2wav, voice, worker

    async def synthesize(self, text: AsyncIterator[str | ModelIds]) -> AsyncGenerator[SpeechChunk, None]:
        stream = self.token2wav.stream(self.voice)
        said, ids, tokens = "", list[int](), list[int]()
        async for item in text:
            if isinstance(item, str):
                said += item
                continue
            ids += item.ids
            tokens += speech_tokens(item.ids)
            if len(tokens) < stream.wanted:  # no chunk yet: not worth a trip to the worker
                continue
            pcm = await self.worker.run(stream.push, tokens)
            tokens = []
            if pcm.size:
                yield SpeechChunk(pcm, SAMPLE_RATE, said, tuple(ids))
                said, ids = "", []
        if tokens:
            await self.worker.run(stream.push, tokens)
        pcm = await self.worker.run(stream.finish)
        if pcm.size:
            yield SpeechChunk(pcm, SAMPLE_RATE, said, tuple(ids))

    async def aclose(self) -> None:
        return None

