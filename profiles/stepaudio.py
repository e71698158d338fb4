"""The stepaudio profile: Step-Audio's tokenizer, Chat and TTS-3B, loaded once per server from
`--model-path`. Nothing here is imported by the embedded profile."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path


from config import ModelConfig, StepAudioConfig
from models.base import LanguageModel, ModelSetupError, SpeechDecoder
from models.stepaudio_chat import local_chat, served_chat, transcribe
from models.tool_json import JsonToolCalls
from models.stepaudio_tts import StepAudioTTS, SystemPrompts, read_speakers
from profiles.packages import log_loaded, log_loading, package_dir, resolve_device
from runtime.workers import ModelWorker
from streaming_tokenizer.stepaudio import StepAudioStream, StepAudioTokenizer


TOKENIZER_DIR, CHAT_DIR, TTS_DIR = "Step-Audio-Tokenizer", "Step-Audio-Chat", "Step-Audio-TTS-3B"
EXTRA = "'.[stepaudio]' (and `pip install --no-deps cosyvoice-minicpmo==0.1.0`)"


def check_packages() -> None:
    """Fail before minutes of loading when the optional packages are missing."""
    for module, package in (
        ("funasr", "funasr"),
        ("kaldi_native_fbank", "kaldi-native-fbank"),
        ("hyperpyyaml", "hyperpyyaml"),
        ("matcha", "cosyvoice-minicpmo"),
        ("cosyvoice", "cosyvoice-minicpmo"),
    ):
        package_dir(module, f"{package}, part of {EXTRA}", profile="stepaudio")


def read_clone(path: Path) -> dict[str, str]:
    """A voice file: {"speaker", "prompt_text", "wav_path"}, wav_path relative to the file."""
    try:
        clone = json.loads(path.read_text(encoding="utf-8"))
        missing = {"speaker", "prompt_text", "wav_path"} - set(clone)
    except (ValueError, TypeError) as exc:
        raise ModelSetupError(f"--stepaudio-clone {path}: not a JSON object ({exc})") from None
    if missing:
        raise ModelSetupError(f"--stepaudio-clone {path}: missing {sorted(missing)}")
    wav = path.parent / clone["wav_path"]
    if not wav.is_file():
        raise ModelSetupError(f"--stepaudio-clone {path}: no such wav {wav}")
    return {"speaker": str(clone["speaker"]), "prompt_text": str(clone["prompt_text"]), "wav_path": str(wav)}


def read_tts_prompts(path: Path) -> SystemPrompts:
    """TTS-3B's system prompts: a JSON object with any of without_speaker, with_speaker (where
    `{speaker}` names the registry speaker), rap and humming; the others keep their defaults."""
    names = {f.name for f in fields(SystemPrompts)}
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
        unknown = set(prompts) - names
        if unknown or not all(isinstance(v, str) for v in prompts.values()):
            raise ValueError(f"unknown keys {sorted(unknown)}" if unknown else "values must be strings")
        return SystemPrompts(**prompts)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelSetupError(f"--stepaudio-tts-prompts {path}: want a JSON object with some of {sorted(names)} ({exc})") from None


@dataclass
class StepAudioModels:
    """Owns the loaded Step-Audio models and the worker threads they run in."""

    tokenizer: StepAudioTokenizer
    chat: LanguageModel
    tts: StepAudioTTS
    workers: tuple[ModelWorker, ...]
    config: StepAudioConfig
    turn_end: None = None  # no end-of-turn model: turn detection is `vad`
    turn_cpu_s: float = 0.0  # not timed: on a GPU the CPU is not what runs out

    @property
    def lm(self) -> LanguageModel:
        return self.chat

    @property
    def reply_lm(self) -> LanguageModel:
        return JsonToolCalls(self.chat)

    @property
    def engines(self) -> tuple[LanguageModel, ...]:
        return (self.chat,)

    @property
    def decoder(self) -> SpeechDecoder:
        return self.tts

    async def transcribe(self, audio_text: str) -> str:
        return await transcribe(self.chat, audio_text)

    def session_tokenizer(self) -> StepAudioStream:
        transcriber = self.transcribe if self.config.transcribe else None
        return StepAudioStream(self.tokenizer, self.workers[0], transcriber)


async def load_stepaudio(config: StepAudioConfig, models: ModelConfig) -> StepAudioModels:
    """Load tokenizer, Chat (or connect to its server) and TTS-3B with its decoders, each in its
    worker, logging progress; the voice prompt of the default speaker is prepared up front."""
    check_packages()
    root = Path(config.model_path or ".")
    for name in (TOKENIZER_DIR, TTS_DIR) + ((CHAT_DIR,) if config.chat == "local" else ()):
        if not (root / name).is_dir():
            raise ModelSetupError(f"--model-path {root}: no {name}/ directory")
    clone = read_clone(config.clone) if config.clone else None
    prompts = read_tts_prompts(config.tts_prompts) if config.tts_prompts else None
    if clone is None:
        read_speakers(config.speakers or root / TTS_DIR / "speakers")  # before minutes of loading
    device = resolve_device(config.device)
    # Two tokenizer threads: sessions do not queue behind one another's utterances.
    workers = (
        ModelWorker("tokenizer", threads=2),
        ModelWorker("chat"),
        ModelWorker("tts-lm"),
        ModelWorker("tts-decoder"),
    )
    tokenizer_worker, chat_worker, tts_worker, decoder_worker = workers
    try:
        started = log_loading("stepaudio.tokenizer", path=str(root / TOKENIZER_DIR), device=device)
        tokenizer = await tokenizer_worker.run(StepAudioTokenizer, root / TOKENIZER_DIR, device, models.threads)
        log_loaded("stepaudio.tokenizer", started)

        started = log_loading("stepaudio.chat", backend=config.chat)
        if config.chat == "served":
            chat: LanguageModel = served_chat(
                models.lm_url, models.lm_model, os.environ.get(models.lm_api_key_env), models.max_new_tokens, models.temperature
            )
        else:
            chat = await chat_worker.run(
                local_chat, root / CHAT_DIR, chat_worker, models.max_new_tokens, models.temperature, models.threads
            )
        log_loaded("stepaudio.chat", started)

        started = log_loading("stepaudio.tts", path=str(root / TTS_DIR), speaker=config.speaker)
        tts = await tts_worker.run(
            StepAudioTTS,
            root / TTS_DIR,
            tokenizer.prompt_ids,
            tts_worker,
            decoder_worker,
            device,
            config.speaker,
            threads=models.threads,
            clone=clone,
            system_prompts=prompts or SystemPrompts(),
            speakers=config.speakers,
            dtype=config.dtype,
        )
        await decoder_worker.run(tts.voice, clone or tts.registry_voice(config.speaker))
        log_loaded("stepaudio.tts", started)
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return StepAudioModels(tokenizer, chat, tts, workers, config)
