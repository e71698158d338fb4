"""Smoke test and per-stage timings of the stepaudio profile, for a GPU machine (never needed by CI).

    python -m bench.stepaudio_smoke                       # tiny random weights, built here, on CUDA
    python -m bench.stepaudio_smoke --model-path DIR      # the real weights
    python -m bench.stepaudio_smoke --chat served --lm-url http://host:8000/v1 --lm-model step-audio-chat
    python -m bench.stepaudio_smoke --device cpu          # anywhere

Prints one JSON object: what ran where, and each stage's time (tokenizer on a streamed utterance,
Chat's first token and rate, TTS-3B voice preparation, first audio and real-time factor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.stages import drain_timed
from config import ModelConfig, StepAudioConfig
from models.base import Message

SENTENCE = "(高兴1)今天天气真不错，我们一起去公园散步吧。"


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


async def tokenize_live(models, pcm: np.ndarray) -> tuple[dict, object]:
    """One utterance as a call gives it: 20 ms frames, the pump caught up every 240 ms (the work a
    live call does while the user speaks), then finalize() (the work left after the end of speech)."""
    from streaming_tokenizer.stepaudio import StepAudioStream

    stream = StepAudioStream(models.tokenizer, models.workers[0])
    try:
        stream.begin(())
        started = time.perf_counter()
        for i in range(0, len(pcm), 320):
            stream.feed(pcm[i : i + 320], True)
            if (i // 320) % 12 == 11:
                await stream.drained()
        streamed_s = time.perf_counter() - started
        started = time.perf_counter()
        utterance = await stream.finalize()
        finalize_s = time.perf_counter() - started
    finally:
        await stream.aclose()
    stage = {
        "utterance_s": round(len(pcm) / 16000, 2),
        "streamed_work_ms": _ms(streamed_s),
        "finalize_ms": _ms(finalize_s),
        "restarts": stream.restarts,
        "tokens": utterance.lm_content.count("<audio_") if utterance.lm_content else 0,
    }
    return stage, utterance


async def measure(config: StepAudioConfig, models_config: ModelConfig, seconds: float) -> dict:
    from profiles.loaded import close_models
    from profiles.packages import resolve_device
    from profiles.stepaudio import load_stepaudio

    report: dict = {"device": resolve_device(config.device), "model_path": str(config.model_path)}
    started = time.perf_counter()
    models = await load_stepaudio(config, models_config)
    report["load_s"] = round(time.perf_counter() - started, 2)
    try:
        # Tokenizer: utterances fed as 20 ms frames, the pump kept up, then the end of speech; a
        # steady one, and one whose last second is the loudest (its codes so far start over).
        from testkit.stepaudio_tiny import tone_speech

        steady = tone_speech(seconds)
        loud_end = steady.copy()
        loud_end[-16000:] *= 2.5
        report["tokenizer"] = {}
        for name, clip in (("steady", steady), ("loud_ending", loud_end)):
            pcm = (clip / np.abs(clip).max() * 0.9 * 32767).astype(np.int16)
            report["tokenizer"][name], utterance = await tokenize_live(models, pcm)
        started = time.perf_counter()
        transcript = await models.transcribe(utterance.lm_content or "")
        report["chat_asr"] = {"ms": _ms(time.perf_counter() - started), "chars": len(transcript)}

        # Chat: time to first text and tokens per second, on the audio prompt.
        messages = [Message("system", models_config.system_prompt), Message("user", utterance.lm_content or "")]
        reply = await drain_timed(models.chat.stream(messages))
        first = reply.first_s
        report["chat"] = {
            "first_token_ms": _ms(first) if first is not None else None,
            "deltas": len(reply.items),
            "deltas_per_s": round(len(reply.items) / max(reply.total_s - (first or 0.0), 1e-6), 1),
        }

        # TTS-3B: voice prompt once, then a sentence: first audio and real-time factor.
        started = time.perf_counter()
        await models.tts.decoder_worker.run(models.tts.voice, models.tts.registry_voice(config.speaker))
        report["tts_voice_prepare_ms"] = _ms(time.perf_counter() - started)
        speech = await drain_timed(models.tts.speak(SENTENCE))
        audio_s = sum(chunk.duration_ms for chunk in speech.items) / 1000
        report["tts"] = {
            "first_audio_ms": _ms(speech.first_s) if speech.first_s is not None else None,
            "audio_s": round(audio_s, 2),
            "rtf": round(speech.total_s / audio_s, 3) if audio_s else None,
        }
    finally:
        await close_models(models)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stepaudio_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, help="the real weights; default: tiny random ones built here")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--chat", choices=("local", "served"), default="local")
    parser.add_argument("--lm-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--lm-model", default="step-audio-chat")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the test utterance")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("stepaudio_smoke: CUDA is not available here; pass --device cpu to run on the CPU", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model_path
        if model_path is None:
            from testkit.stepaudio_tiny import build_model_path

            model_path = build_model_path(Path(scratch))
        config = StepAudioConfig(model_path=model_path, chat=args.chat, device=args.device)
        models_config = ModelConfig(
            lm_url=args.lm_url, lm_model=args.lm_model, max_new_tokens=args.max_new_tokens, temperature=0.7
        )
        report = asyncio.run(measure(config, models_config, args.seconds))
    report["weights"] = "real" if args.model_path else "tiny random"
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
