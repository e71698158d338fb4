"""What the models' compute threads do to the event loop: a 20 ms ticker on the loop (standing for
the paced audio output) while the embedded engines work in their worker threads, with their thread
counts and busy-waiting chosen per run.

    .venv/bin/python -m bench.experiments.loop_lag            # every setting, a table of loop lateness

Each run repeats LM replies (llama.cpp), speech synthesis (piper) and transcription (Moonshine)
together for a few seconds; the table gives the ticker's lateness (p50, p99, max) and how many
ticks came more than 40 ms late (the output then has a gap a listener can hear).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from models.base import Message
from models.llamacpp_lm import LlamaCppLM
from models.piper_tts import PiperDecoder
from profiles.embedded import moonshine_model_dir, piper_voice_files, smollm2_gguf
from runtime.audio import SAMPLE_RATE
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.moonshine import MoonshineEngine

TICK_S = 0.02
LATE_S = 0.04


@dataclass(frozen=True)
class Setting:
    name: str
    lm_threads: int
    tts_threads: int
    busy_wait: bool  # llama.cpp polling and ONNX Runtime spinning, as their defaults have them


SETTINGS = (
    Setting("idle loop (no models working)", 0, 0, False),
    Setting("LM 2 + TTS 2 threads, busy-waiting (the engines' defaults)", 2, 2, True),
    Setting("LM 2 + TTS 2 threads, no busy-waiting", 2, 2, False),
    Setting("LM 1 + TTS 1 threads, no busy-waiting (the server's share on 2 cores)", 1, 1, False),
)


async def ticker(stop: asyncio.Event, lateness: list[float]) -> None:
    due = time.monotonic()
    while not stop.is_set():
        due += TICK_S
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        lateness.append(max(0.0, time.monotonic() - due))


async def run(setting: Setting, seconds: float) -> dict[str, float]:
    lateness: list[float] = []
    stop = asyncio.Event()
    tasks = TaskOwner("loop-lag")
    tasks.spawn(ticker(stop, lateness), "ticker")
    workers: list[ModelWorker] = []
    if setting.lm_threads:
        lm_worker, tts_worker, asr_worker = ModelWorker("lm", 2), ModelWorker("tts"), ModelWorker("asr")
        workers = [lm_worker, tts_worker, asr_worker]
        lm = await lm_worker.run(
            LlamaCppLM, smollm2_gguf(), lm_worker, 60, 0.0, setting.lm_threads, 2, busy_wait=setting.busy_wait
        )
        voice, config = piper_voice_files()
        tts = await tts_worker.run(PiperDecoder, voice, config, tts_worker, setting.tts_threads, setting.busy_wait)
        asr = await asr_worker.run(MoonshineEngine, moonshine_model_dir(), asr_worker)
        speech = await tts_worker.run(tts.speak_now, "Please book a table for two people tomorrow evening.")
        speech16 = np.interp(
            np.arange(0, len(speech), tts.sample_rate / SAMPLE_RATE), np.arange(len(speech)), speech
        ).astype(np.float32)

        async def replies() -> None:
            while True:
                messages = [Message("user", "Tell me about the sea in a few sentences.")]
                async with aclosing(lm.stream(messages)) as deltas:
                    async for _ in deltas:
                        pass

        async def speaking() -> None:
            while True:
                await tts_worker.run(tts.speak_now, "The sea is wide and deep, and it is full of life.")

        async def listening() -> None:
            while True:
                await asr.transcribe(speech16)

        for name, work in (("lm", replies), ("lm2", replies), ("tts", speaking), ("asr", listening)):
            tasks.spawn(work(), name)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(0.25)  # the measured period; the ticker records what happens in it
    stop.set()
    await tasks.aclose()
    for worker in workers:
        worker.close()
    if setting.lm_threads:
        await tts.aclose()
        await lm.aclose()
    ms = sorted(1000 * x for x in lateness)
    return {
        "ticks": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
        "late_ticks": sum(1 for x in ms if x > 1000 * LATE_S),
    }


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.loop_lag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="measured time per setting (default 8)")
    args = parser.parse_args(argv)
    print("| setting | ticks | p50 ms | p99 ms | max ms | ticks > 40 ms late |")
    print("|---|---|---|---|---|---|")
    for setting in SETTINGS:
        result = await run(setting, args.seconds)
        print(f"| {setting.name} | {result['ticks']} | {result['p50_ms']} | {result['p99_ms']} | {result['max_ms']} | {result['late_ticks']} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
