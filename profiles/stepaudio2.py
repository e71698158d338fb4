"""The stepaudio2 profile: Step-Audio 2 mini from `--model-path` (or served by StepFun's vLLM) and
its token2wav in this process, loaded once per server. The model hears the user's speech itself: no
ASR in front of it. Nothing here is imported by the embedded profile."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config import ModelConfig, StepAudio2Config
from models.base import LanguageModel, ModelSetupError, SpeechDecoder
from models.stepaudio2_chat import StepAudio2Chat
from models.stepaudio2_input import WINDOW_SAMPLES
from models.stepaudio2_served import StepAudio2Served
from models.stepaudio2_speech import StepAudio2Speech
from profiles.packages import log_loaded, log_loading, package_dir, resolve_device
from runtime.workers import ModelWorker
from streaming_tokenizer.heard_speech import HeardSpeech

TOKEN2WAV_DIR = "token2wav"
DEFAULT_VOICE = "default_female.wav"


def check_packages() -> None:
    """Fail before minutes of loading when the optional packages are missing."""
    if "stepaudio2" not in sys.modules:  # once entered, its module has no spec to find
        package_dir("stepaudio2", "minicpmo-utils==1.0.7", pip_args="--no-deps", profile="stepaudio2")
    package_dir("hyperpyyaml", "hyperpyyaml", profile="stepaudio2")


def voice_path(config: StepAudio2Config, root: Path) -> Path:
    path = config.voice or root / DEFAULT_VOICE
    if not path.is_file():
        raise ModelSetupError(
            f"--stepaudio2-voice: no {path}; the published default voice is assets/{DEFAULT_VOICE} of StepFun's "
            "Step-Audio2 repository: put it there, or name another wav"
        )
    return path


def read_voice(path: Path) -> tuple[np.ndarray, int]:
    """A wav's samples (mono float) and rate."""
    import soundfile

    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError) as exc:
        raise ModelSetupError(f"--stepaudio2-voice {path}: not a readable wav ({exc})") from None
    return samples.mean(axis=1), int(rate)


@dataclass
class StepAudio2Models:
    """Owns the loaded Step-Audio 2 model, its token2wav and the worker threads they run in."""

    chat: StepAudio2Chat | StepAudio2Served
    speech: StepAudio2Speech
    workers: tuple[ModelWorker, ...]
    config: StepAudio2Config
    turn_end: None = None  # no end-of-turn model: turn detection is `vad`
    turn_cpu_s: float = 0.0  # not timed: on a GPU the CPU is not what runs out

    @property
    def lm(self) -> LanguageModel:
        return self.chat

    @property
    def reply_lm(self) -> LanguageModel:
        return self.chat

    @property
    def engines(self) -> tuple[LanguageModel, ...]:
        return (self.chat,)

    @property
    def decoder(self) -> SpeechDecoder:
        return self.speech

    def session_tokenizer(self) -> HeardSpeech:
        listener = self.chat.listen if isinstance(self.chat, StepAudio2Chat) else None  # a served model's encoder is not ours
        return HeardSpeech(self.chat.transcribe if self.config.transcribe else None, listener, WINDOW_SAMPLES)


async def load_stepaudio2(config: StepAudio2Config, model_path: Path, models: ModelConfig) -> StepAudio2Models:
    """Load the model (or connect to its server) and token2wav with the voice prompt, each in its
    worker, logging progress; what is missing is said before minutes of loading."""
    check_packages()
    root = Path(model_path)
    if not (root / TOKEN2WAV_DIR).is_dir():
        raise ModelSetupError(f"--model-path {root}: no {TOKEN2WAV_DIR}/ directory")
    if config.lm == "local" and not (root / "config.json").is_file():
        raise ModelSetupError(f"--model-path {root}: no config.json (the Step-Audio-2-mini directory)")
    samples, rate = read_voice(voice_path(config, root))
    device = resolve_device(config.device)
    workers = (ModelWorker("stepaudio2-lm"), ModelWorker("token2wav"))
    lm_worker, speech_worker = workers
    try:
        if config.lm == "served":
            started = log_loading("stepaudio2.lm", url=models.lm_url, served_model=models.lm_model)
            chat: StepAudio2Chat | StepAudio2Served = StepAudio2Served(
                models.lm_url, models.lm_model, os.environ.get(models.lm_api_key_env), config.max_new_tokens, config.temperature
            )
        else:
            started = log_loading("stepaudio2.lm", path=str(root), device=device)
            chat = await lm_worker.run(_local_chat, root, lm_worker, device, config, models.threads)
        log_loaded("stepaudio2.lm", started)

        started = log_loading("stepaudio2.token2wav", path=str(root / TOKEN2WAV_DIR), device=device)
        from models.stepaudio2_token2wav import Token2Wav

        token2wav = await speech_worker.run(Token2Wav, root / TOKEN2WAV_DIR, device, models.threads)
        voice = await speech_worker.run(token2wav.voice, samples, rate)
        log_loaded("stepaudio2.token2wav", started)
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    return StepAudio2Models(chat, StepAudio2Speech(token2wav, voice, speech_worker), workers, config)


def _local_chat(root: Path, worker: ModelWorker, device: str, config: StepAudio2Config, threads: int) -> StepAudio2Chat:
    """The model in this process: bf16 on a GPU, as the reference runs it; fp32 on the CPU."""
    import torch

    from models.stepaudio2_lm import Sampling, StepAudio2Model, load_tokenizer

    if device == "cpu":
        torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = StepAudio2Model.load(root, dtype=dtype, device=device)
    sampling = Sampling(temperature=config.temperature)
    return StepAudio2Chat(model, load_tokenizer(root), worker, config.max_new_tokens, sampling)
