"""Stage benchmark of the embedded profile: each model alone, then whole turns over real WebRTC.

    python -m bench.stages [--turns 10] [--out bench/results]

Prints a Markdown table and writes the raw numbers as JSON. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, Generic, TypeVar

import numpy as np
import soxr
from aiohttp import web

from config import AppConfig, ModelConfig, ServerConfig
from context.dialog import TranscriptStore
from models.base import Message
from profiles import open_profile
from profiles.embedded import EmbeddedModels, load_embedded
from profiles.loaded import close_models
from realtime.server import build_app
from realtime.webrtc import use_loopback_ice_only
from testkit.peer import RATE, ClientPeer

UTTERANCES = {
    1: "Hello there.",
    3: "Could you tell me what the weather is like today?",
    6: "I would like to book a quiet table for dinner tonight, somewhere near the river, if you can.",
}
CLAUSE = "The weather is lovely today, friend."
PARAGRAPH = (
    "Paris is the capital of France. It is known for its museums, its cafes and the river that runs "
    "through the middle of the city. Many people visit it every year."
)
QUESTIONS = [
    "What is the capital of France?",
    "Can you recommend a good book?",
    "How are you today?",
    "What should I cook for dinner?",
    "Tell me a fun fact about cats.",
    "What is the tallest mountain?",
    "How do I make a cup of tea?",
    "What time zone is London in?",
    "Why is the sky blue?",
    "Can you tell me a short joke?",
]


T = TypeVar("T")


@dataclass
class Drained(Generic[T]):
    """What a stream gave, when its first item came and when it ended (seconds from the start)."""

    items: list[T]
    first_s: float | None
    total_s: float


async def drain_timed(stream: AsyncGenerator[T, None]) -> Drained[T]:
    """Read a model's stream to its end (closing it), timing the first item and the whole."""
    started = time.monotonic()
    first: float | None = None
    items: list[T] = []
    async with aclosing(stream) as reading:
        async for item in reading:
            first = first if first is not None else time.monotonic() - started
            items.append(item)
    return Drained(items, first, time.monotonic() - started)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def speech(models: EmbeddedModels, text: str, rate: int) -> np.ndarray:
    pcm = await models.tts.worker.run(models.tts.speak_now, text)
    return soxr.resample(pcm, models.tts.sample_rate, rate).astype(np.float32)


async def asr_stage(models: EmbeddedModels) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for seconds, text in UTTERANCES.items():
        pcm = await speech(models, text, 16000)
        timings = []
        for _ in range(3):
            started = time.monotonic()
            await models.asr.transcribe(pcm)
            timings.append((time.monotonic() - started) * 1000)
        out[f"{seconds}s"] = {"audio_s": round(len(pcm) / 16000, 2), "finalize_ms": round(statistics.median(timings))}
    return out


async def lm_stage(models: EmbeddedModels) -> dict[str, Any]:
    ttfts, rates = [], []
    for question in QUESTIONS[:5]:
        reply = await drain_timed(models.lm.stream([Message("system", models.config.system_prompt), Message("user", question)]))
        ttfts.append(reply.first_s * 1000 if reply.first_s is not None else float("nan"))
        text = "".join(reply.items)
        tokens = models.lm.count_tokens(text) if hasattr(models.lm, "count_tokens") else len(text.split())
        if reply.first_s is not None and reply.total_s > reply.first_s:
            rates.append(tokens / (reply.total_s - reply.first_s))
    return {"ttft_ms_p50": round(_pct(ttfts, 50)), "tokens_per_s_p50": round(_pct(rates, 50), 1)}


async def tts_stage(models: EmbeddedModels) -> dict[str, Any]:
    firsts = []
    for _ in range(5):
        started = time.monotonic()
        await models.tts.worker.run(models.tts.speak_now, CLAUSE)
        firsts.append((time.monotonic() - started) * 1000)
    started = time.monotonic()
    pcm = await models.tts.worker.run(models.tts.speak_now, PARAGRAPH)
    rtf = (time.monotonic() - started) / (len(pcm) / models.tts.sample_rate)
    return {"first_audio_ms_6_words_p50": round(_pct(firsts, 50)), "rtf": round(rtf, 3)}


async def turns_stage(models: EmbeddedModels, turns: int, data_dir: Path) -> dict[str, Any]:
    config = AppConfig(server=ServerConfig(port=0, loopback_ice=True, data_dir=data_dir), models=models.config)
    use_loopback_ice_only()
    profile = await open_profile(config, TranscriptStore(data_dir), models=models)
    runner = web.AppRunner(build_app(config, profile.factory, TranscriptStore(data_dir)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    rows: list[dict[str, Any]] = []
    try:
        clips = [await speech(models, q, RATE) for q in (QUESTIONS * 2)[:turns]]
        peer = ClientPeer(url)
        await peer.connect()
        await peer.wait_event("session.created")
        for index, clip in enumerate(clips, 1):
            seen = sum(1 for e in peer.events if e["type"] == "metrics.turn")
            peer.speak(clip, RATE)
            await peer.changed.wait_for(
                lambda: sum(1 for e in peer.events if e["type"] == "metrics.turn") > seen, timeout=120
            )
            metrics = [e for e in peer.events if e["type"] == "metrics.turn"][-1]
            rows.append({k: v for k, v in metrics.items() if not k.startswith("_")})
            print(f"  turn {index}/{len(clips)}: server_v2v_ms={metrics.get('server_v2v_ms')}", flush=True)
        await peer.close()
    finally:
        await runner.cleanup()
    v2v = [r["server_v2v_ms"] for r in rows if "server_v2v_ms" in r]
    commit = config.turn.endpointing.commit_ms
    summary = {
        f"{k}_p50": round(_pct([r[k] for r in rows if k in r], 50))
        for k in ("asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms")
    }
    summary.update(
        commit_ms=commit,
        server_v2v_ms_p90=round(_pct(v2v, 90)),
        v2v_minus_commit_p50=round(_pct(v2v, 50) - commit),
        turns=len(rows),
    )
    return {"summary": summary, "turns": rows}


def markdown(results: dict[str, Any]) -> str:
    asr, lm, tts, turns = results["asr"], results["lm"], results["tts"], results["turns"]["summary"]
    lines = ["| stage | measure | value | target |", "|---|---|---|---|"]
    for key, row in asr.items():
        target = "<= 400 ms" if key == "3s" else ""
        lines.append(f"| ASR | finalize, {row['audio_s']} s utterance | {row['finalize_ms']} ms | {target} |")
    lines.append(f"| LM | time to first token (p50) | {lm['ttft_ms_p50']} ms | <= 200 ms |")
    lines.append(f"| LM | tokens/s (p50) | {lm['tokens_per_s_p50']} | |")
    lines.append(f"| TTS | first audio, 6-word clause (p50) | {tts['first_audio_ms_6_words_p50']} ms | <= 100 ms |")
    lines.append(f"| TTS | real-time factor | {tts['rtf']} | |")
    lines.append(
        f"| turn | server_v2v_ms p50 / p90 over {turns['turns']} turns | {turns['server_v2v_ms_p50']} / "
        f"{turns['server_v2v_ms_p90']} ms (commit_ms {turns['commit_ms']}) | p50 <= commit_ms + 100 |"
    )
    lines.append(
        f"| turn | in-turn asr / lm first token / tts first audio (p50) | {turns['asr_ms_p50']} / "
        f"{turns['lm_ttft_ms_p50']} / {turns['tts_first_audio_ms_p50']} ms | |"
    )
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    print("loading models ...", flush=True)
    models = await load_embedded(ModelConfig())
    try:
        results: dict[str, Any] = {}
        for name, stage in (("asr", asr_stage), ("lm", lm_stage), ("tts", tts_stage)):
            print(f"stage {name} ...", flush=True)
            results[name] = await stage(models)
        print(f"stage turns ({args.turns} turns over WebRTC) ...", flush=True)
        results["turns"] = await turns_stage(models, args.turns, args.out / "stages-data")
    finally:
        await close_models(models)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stages-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    asyncio.run(main())
