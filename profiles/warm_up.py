"""One turn through every engine at start-up, as a call makes it: the first calls after a start are
then as fast as later ones, and the turn's CPU is what a call costs this machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import AsyncIterator

import numpy as np
import soxr

from models.base import LanguageModel, Message
from profiles.loaded import LoadedModels
from runtime.audio import FRAME_SAMPLES, SAMPLE_RATE, float_to_int16
from runtime.procfs import tree_cpu_seconds

QUESTION = "Hello there, can you tell me what the weather will be like this afternoon?"
ANSWER = "It should stay dry and mild this afternoon, with a light breeze from the west."  # for an LM not ours
PREFIX_FRAMES = 15  # the 300 ms of audio the endpointer keeps before an onset


async def warm_up(models: LoadedModels, system_prompt: str, lm_slots: int) -> float:
    """Speak a question, hear it through a session's tokenizer, judge its end, answer it and speak
    the answer; then fill each of the LM's `lm_slots` with the system prompt (0: the LM is not
    ours, a server elsewhere; a fixed answer is spoken). Returns the CPU seconds of the turn
    (every thread and child process of this one): what one call's turn costs this machine."""
    question = await _speech(models, QUESTION)
    started = tree_cpu_seconds(os.getpid())
    tokenizer = models.session_tokenizer()
    try:
        frames = [question[i : i + FRAME_SAMPLES] for i in range(0, len(question) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]
        tokenizer.begin(tuple(frames[:PREFIX_FRAMES]))
        for frame in frames[PREFIX_FRAMES:]:
            tokenizer.feed(frame, True)
            await asyncio.sleep(0)  # as frames come in a call: the partial transcripts run meanwhile
        heard = await tokenizer.finalize()
    finally:
        await tokenizer.aclose()
    text = heard.text or QUESTION
    if models.turn_end is not None:
        scorers = models.turn_end
        await asyncio.gather(*(
            score for score in (scorers.audio and scorers.audio(question), scorers.text and scorers.text(text)) if score
        ))
    messages = [Message("system", system_prompt), Message("user", text)]
    answer = _text(models.reply_lm, messages) if lm_slots else _once(ANSWER)
    async with contextlib.aclosing(models.decoder.synthesize(answer)) as speech:
        async for _ in speech:
            pass
    turn_cpu_s = tree_cpu_seconds(os.getpid()) - started
    await fill_slots(models.lm, system_prompt, lm_slots)
    return turn_cpu_s


async def fill_slots(lm: LanguageModel, system_prompt: str, slots: int) -> None:
    """Have each of the LM's `slots` evaluate the system prompt: `slots` requests at once take one
    slot each, and a call's first prompt then finds its beginning cached in whichever it gets."""
    await asyncio.gather(*(_first_token(lm, [Message("system", system_prompt), Message("user", "Hello.")]) for _ in range(slots)))


async def _speech(models: LoadedModels, text: str) -> np.ndarray:
    """`text` spoken by the profile's own decoder, as 16 kHz int16 with silence around it."""
    chunks = []
    async with contextlib.aclosing(models.decoder.synthesize(_once(text))) as speech:
        async for chunk in speech:
            pcm = np.asarray(chunk.pcm, dtype=np.float32).reshape(-1)
            chunks.append(soxr.resample(pcm, chunk.sample_rate, SAMPLE_RATE) if chunk.sample_rate != SAMPLE_RATE else pcm)
    silence = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    return float_to_int16(np.concatenate([silence[: FRAME_SAMPLES * PREFIX_FRAMES], *chunks, silence]))


async def _once(text: str) -> AsyncIterator[str]:
    yield text


async def _text(lm: LanguageModel, messages: list[Message]) -> AsyncIterator[str]:
    async with contextlib.aclosing(lm.stream(messages)) as deltas:
        async for delta in deltas:
            if isinstance(delta, str):
                yield delta


async def _first_token(lm: LanguageModel, messages: list[Message]) -> None:
    # Read to its end: a generation let go early is dropped by llama.cpp, its slot's cache with it.
    async with contextlib.aclosing(lm.stream(messages, max_new_tokens=1)) as deltas:
        async for _ in deltas:
            pass
