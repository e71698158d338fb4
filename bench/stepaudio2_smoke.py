"""Smoke test and per-stage timings of the Step-Audio 2 mini code, for a GPU machine (never needed by CI).

    python -m bench.stepaudio2_smoke                       # tiny random weights, built here, on CUDA
    python -m bench.stepaudio2_smoke --model-path DIR      # Step-Audio-2-mini (token2wav/ inside DIR)
    python -m bench.stepaudio2_smoke --device cpu          # anywhere

Prints one JSON object: what ran where, and each stage's time: a spoken question's log-mel, the
history prefilled while the user speaks, the first token after the pause (the question's windows
and the turn's end through the model), tokens per second, and token2wav's voice preparation, first
streamed chunk and real-time factor. On the tiny weights the reply's ids are random, so token2wav
decodes random speech tokens: the timings show the code paths run on the device, not the model's
speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def measure_lm(directory: Path, device: str, seconds: float, max_new_tokens: int) -> dict:
    import torch

    from models.stepaudio2_input import Audio, Turn, chat_pieces, piece_ids
    from models.stepaudio2_lm import Sampling, StepAudio2Model, load_tokenizer
    from testkit.stepaudio_tiny import tone_speech

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    model, tokenizer = StepAudio2Model.load(directory, dtype, device), load_tokenizer(directory)
    report: dict = {"load_s": round(time.perf_counter() - started, 2), "dtype": str(dtype)}
    history = [Turn("system", "You are a helpful assistant."), Turn("user", "Hello."), Turn("assistant", "Hi! How can I help?")]
    started = time.perf_counter()
    pieces, mels = chat_pieces([*history, Turn("user", (Audio(tone_speech(seconds, 16000).astype(np.float32)),)), Turn("assistant", "<tts_start>", eot=False)])
    report["mel_ms"] = _ms(time.perf_counter() - started)
    mels = [m.to(device) for m in mels]
    ids = piece_ids(tokenizer, pieces)
    started = time.perf_counter()
    model.prefill(piece_ids(tokenizer, chat_pieces(history)[0]))
    report["history_prefill_ms"] = _ms(time.perf_counter() - started)
    started = time.perf_counter()
    reply = model.generate(ids, mels, Sampling(), max_new_tokens, frozenset({tokenizer.convert_tokens_to_ids("<|EOT|>")}))
    next(reply)
    report["first_token_ms"] = _ms(time.perf_counter() - started)
    started, count = time.perf_counter(), 1 + sum(1 for _ in reply)
    report["tokens"] = count
    report["tokens_per_s"] = round((count - 1) / max(time.perf_counter() - started, 1e-6), 1)
    return report


def measure_token2wav(directory: Path, device: str, tokens: int) -> dict:
    from models.stepaudio2_token2wav import CHUNK_TOKENS, LOOKAHEAD_TOKENS, SAMPLE_RATE, Token2Wav
    from testkit.stepaudio_tiny import tone_speech

    started = time.perf_counter()
    model = Token2Wav(directory, device)
    report: dict = {"load_s": round(time.perf_counter() - started, 2)}
    started = time.perf_counter()
    voice = model.voice(tone_speech(3.0, 22050).astype(np.float32), 22050)
    report["voice_ms"] = _ms(time.perf_counter() - started)
    speech = [int(t) for t in np.random.default_rng(0).integers(0, 6561, tokens)]
    stream = model.stream(voice)
    started = time.perf_counter()
    first = stream.push(speech[: CHUNK_TOKENS + LOOKAHEAD_TOKENS])
    report["first_chunk_ms"] = _ms(time.perf_counter() - started)
    audio = [first, stream.push(speech[CHUNK_TOKENS + LOOKAHEAD_TOKENS :]), stream.finish()]
    total = time.perf_counter() - started
    seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    report["audio_s"] = round(seconds, 2)
    report["rtf"] = round(total / seconds, 3)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stepaudio2_smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", type=Path, help="Step-Audio-2-mini (with token2wav/); default: tiny random weights built here")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of the spoken question")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--speech-tokens", type=int, default=250, help="speech tokens token2wav decodes (10 s)")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("stepaudio2_smoke: CUDA is not available here; pass --device cpu to run on the CPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        model_path = args.model_path
        if model_path is None:
            from testkit.stepaudio2_tiny import build_model_dir, build_token2wav_dir

            model_path = build_model_dir(Path(scratch) / "Step-Audio-2-mini")
            build_token2wav_dir(model_path / "token2wav")
        report = {
            "device": args.device,
            "model_path": str(args.model_path or "tiny random weights"),
            "lm": measure_lm(model_path, args.device, args.seconds, args.max_new_tokens),
            "token2wav": measure_token2wav(model_path / "token2wav", args.device, args.speech_tokens),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
