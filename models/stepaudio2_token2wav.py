"""Step-Audio 2's token2wav: CosyVoice2 speech tokens (25 a second) -> 24 kHz audio, in one pass
as StepFun's `token2wav.py` does it, or streamed chunk by chunk.

The model classes (the causal flow with its DiT estimator, HiFT) come from `minicpmo-utils`, which
packages StepFun's modules; the driver is ours. A voice prompt is prepared as the reference
prepares it: its speech tokens from the published tokenizer ONNX (on Whisper's 128-bin log-mel of
the 16 kHz prompt), its CAM++ x-vector, and its 24 kHz mel, resampled as torchaudio does.
Streaming: the flow's caches are set up from the prompt once per reply; each chunk of 25 tokens
goes in with the 3 tokens after it as look-ahead; the vocoder re-renders the last 8 mel frames of
the previous chunk and cross-fades their 3,840 samples, so a chunk's audio is out as soon as its
tokens are in, less that overlap.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.cosyvoice_decoder import XVECTOR_RATE, import_cosyvoice, xvector_features
from models.stepaudio2_input import log_mel
from runtime.sinc_resample import resample

SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # two mel frames of 480 samples
CHUNK_TOKENS = 25
LOOKAHEAD_TOKENS = 3
MEL_CACHE_FRAMES = 8
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * 480
ESTIMATOR_KEEP_FRAMES = 100  # the estimator attends to the prompt and this many frames before a chunk
N_TIMESTEPS = 10
# flow.yaml names StepFun's own module paths; minicpmo-utils keeps them under `stepaudio2.`.
_MODULE_PATHS = re.compile(r"(!(?:new|name):)cosyvoice2\.")


@dataclass(frozen=True)
class Voice:
    """What the flow is conditioned on for one voice prompt."""

    tokens: Any  # torch int32 (1, n)
    embedding: Any  # torch float (1, 192)
    mel: Any  # torch float (1, frames, 80), 24 kHz


class Token2Wav:
    """Owns one token2wav directory (`flow.yaml`, `flow.pt`, `hift.pt`, `campplus.onnx`,
    `speech_tokenizer_v2_25hz.onnx`) on one device. Stateless between calls: each reply streams
    in its own `Token2WavStream`."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int = 1) -> None:
        import_stepaudio2_modules()
        import onnxruntime
        import torch
        from hyperpyyaml import load_hyperpyyaml
        from stepaudio2.flashcosyvoice.modules.hifigan import HiFTGenerator

        self.device = torch.device(device)
        self.flow = load_hyperpyyaml(_MODULE_PATHS.sub(r"\1stepaudio2.cosyvoice2.", (directory / "flow.yaml").read_text()))["flow"]
        self.flow.load_state_dict(torch.load(directory / "flow.pt", map_location="cpu", weights_only=True), strict=True)
        self.flow.to(self.device).eval()
        _size_cache_buffers(self.flow.decoder)
        _untraced(type(self.flow.encoder))
        self.hift = HiFTGenerator()
        state = torch.load(directory / "hift.pt", map_location="cpu", weights_only=True)
        self.hift.load_state_dict({k.removeprefix("generator."): v for k, v in state.items()}, strict=True)
        self.hift.to(self.device).eval()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self._campplus = onnxruntime.InferenceSession(str(directory / "campplus.onnx"), options, providers=["CPUExecutionProvider"])
        self._tokenizer = onnxruntime.InferenceSession(
            str(directory / "speech_tokenizer_v2_25hz.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def voice(self, prompt: np.ndarray, rate: int) -> Voice:
        """The conditioning of a voice prompt (mono float audio at `rate`)."""
        import torch
        from stepaudio2.flashcosyvoice.utils.audio import mel_spectrogram

        audio16 = resample(prompt, rate, XVECTOR_RATE)
        mel128 = log_mel(audio16, padding=0).numpy()  # Whisper's, as the speech tokenizer reads it
        inputs = self._tokenizer.get_inputs()
        tokens = self._tokenizer.run(None, {inputs[0].name: mel128[None], inputs[1].name: np.array([mel128.shape[1]], dtype=np.int32)})[0]
        embedding = self._campplus.run(None, {self._campplus.get_inputs()[0].name: xvector_features(audio16)[None]})[0]
        mel = mel_spectrogram(torch.from_numpy(resample(prompt, rate, SAMPLE_RATE))[None]).transpose(1, 2)
        return Voice(
            torch.tensor(np.asarray(tokens).reshape(1, -1), dtype=torch.int32, device=self.device),
            torch.tensor(np.asarray(embedding, dtype=np.float32).reshape(1, -1), device=self.device),
            mel.to(self.device),
        )

    def flow_mel(self, tokens: list[int], voice: Voice) -> Any:
        """(1, 80, 2 * len(tokens)) mel of the tokens in one pass, the reference's way."""
        import torch

        speech = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        with torch.inference_mode():
            return self.flow.inference(
                speech, torch.tensor([len(tokens)], dtype=torch.int32, device=self.device),
                voice.tokens, torch.tensor([voice.tokens.shape[1]], dtype=torch.int32, device=self.device),
                voice.mel, torch.tensor([voice.mel.shape[1]], dtype=torch.int32, device=self.device),
                voice.embedding, N_TIMESTEPS,
            )

    def decode(self, tokens: list[int], voice: Voice) -> np.ndarray:
        """The reply's 24 kHz audio in one pass (flow, then HiFT), as the reference makes it."""
        import torch

        with torch.inference_mode():
            speech, _ = self.hift(speech_feat=self.flow_mel(tokens, voice))
        return speech[0].float().cpu().numpy()

    def stream(self, voice: Voice) -> Token2WavStream:
        return Token2WavStream(self, voice)


class Token2WavStream:
    """One reply's streaming state: the flow's caches (set up from the voice prompt), the tokens
    not yet decoded, and the vocoder's overlap."""

    def __init__(self, model: Token2Wav, voice: Voice) -> None:
        import torch

        self._model, self._voice = model, voice
        self._pending: list[int] = []
        self._flow_cache: dict[str, Any] | None = None
        self._mel = torch.zeros(1, 80, 0, device=model.device)
        self._source = torch.zeros(1, 1, 0, device=model.device)
        self._speech = torch.zeros(1, 0, device=model.device)
        self._window = torch.from_numpy(np.hamming(2 * SOURCE_CACHE_SAMPLES)).float().to(model.device)
        self.mel_frames: list[Any] = []  # each chunk's flow mel, for comparison with the one pass

    @property
    def wanted(self) -> int:
        """Tokens still to come before the next chunk can be decoded."""
        return CHUNK_TOKENS + LOOKAHEAD_TOKENS - len(self._pending)

    def push(self, tokens: list[int]) -> np.ndarray:
        """Audio ready once these tokens are in: each whole chunk that has its look-ahead."""
        self._pending += tokens
        out = []
        while len(self._pending) >= CHUNK_TOKENS + LOOKAHEAD_TOKENS:
            out.append(self._chunk(self._pending[: CHUNK_TOKENS + LOOKAHEAD_TOKENS], last=False))
            del self._pending[:CHUNK_TOKENS]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def finish(self) -> np.ndarray:
        """The rest of the reply's audio: the tokens left, with no look-ahead, and the overlap."""
        if self._pending:
            audio = self._chunk(self._pending, last=True)
            self._pending = []
            return audio
        return self._speech[0].cpu().numpy().copy()

    def _setup(self) -> None:
        import torch

        voice, flow = self._voice, self._model.flow
        n = voice.tokens.shape[1]
        lookahead = voice.tokens.repeat(1, -(-LOOKAHEAD_TOKENS // n))[:, :LOOKAHEAD_TOKENS]  # the cache wants look-ahead too
        frames = n * flow.up_rate
        mel = voice.mel[:, :frames]
        if mel.shape[1] < frames:  # the prompt's mel on exactly its tokens' frames
            mel = torch.nn.functional.pad(mel.transpose(1, 2), (0, frames - mel.shape[1]), mode="replicate").transpose(1, 2)
        cache = flow.setup_cache(torch.cat([voice.tokens, lookahead], dim=1), mel, voice.embedding, n_timesteps=N_TIMESTEPS)
        self._prompt_frames = frames
        self._flow_cache = {key: value.clone() for key, value in cache.items()}

    def _chunk(self, tokens: list[int], last: bool) -> np.ndarray:
        import torch

        if self._flow_cache is None:
            self._setup()
        model = self._model
        with torch.inference_mode():
            mel, cache = model.flow.inference_chunk(
                token=torch.tensor([tokens], dtype=torch.int32, device=model.device),
                spk=self._voice.embedding, cache=self._flow_cache, last_chunk=last, n_timesteps=N_TIMESTEPS,
            )
            self.mel_frames.append(mel.clone())
            self._flow_cache = {key: value.clone() for key, value in cache.items()}
            attended = self._flow_cache["estimator_att_cache"]
            if attended.shape[4] > self._prompt_frames + ESTIMATOR_KEEP_FRAMES:  # bounded: the prompt and the latest frames
                keep = torch.cat([attended[..., : self._prompt_frames, :], attended[..., -ESTIMATOR_KEEP_FRAMES:, :]], dim=4)
                self._flow_cache["estimator_att_cache"] = keep
            mel = torch.cat([self._mel, mel], dim=2)
            speech, source = model.hift(mel, self._source)
            overlap = self._speech.shape[1]
            if overlap:
                faded = speech[:, :overlap] * self._window[:overlap] + self._speech * self._window[SOURCE_CACHE_SAMPLES : SOURCE_CACHE_SAMPLES + overlap]
                speech = torch.cat([faded, speech[:, overlap:]], dim=1)
            self._mel = mel[:, :, -MEL_CACHE_FRAMES:].clone()
            self._source = source[:, :, -SOURCE_CACHE_SAMPLES:].clone()
            self._speech = speech[:, -SOURCE_CACHE_SAMPLES:].clone()
            if not last:
                speech = speech[:, :-SOURCE_CACHE_SAMPLES]
        return speech[0].float().cpu().numpy()


def import_stepaudio2_modules() -> None:
    """Make `minicpmo-utils`'s `stepaudio2.*` model modules importable without torchaudio: its
    package `__init__` imports its own token2wav driver (torchaudio, s3tokenizer), which this
    project does not use, so the package is entered without running it."""
    import_cosyvoice()
    if "stepaudio2" not in sys.modules:
        spec = importlib.util.find_spec("stepaudio2")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("Step-Audio 2's token2wav needs minicpmo-utils (pip install --no-deps minicpmo-utils==1.0.7)")
        package = types.ModuleType("stepaudio2", "minicpmo-utils' model modules, its own driver not loaded")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["stepaudio2"] = package


def _untraced(encoder: type) -> None:
    """StepFun wraps the encoder's `forward_chunk` in `torch.compile` with the `eager` backend,
    which computes the same as the plain method and only adds tracing (7 s at the first chunk on
    a CPU): the plain method is used."""
    original = getattr(encoder.forward_chunk, "_torchdynamo_orig_callable", None)
    if original is not None:
        encoder.forward_chunk = original


def _size_cache_buffers(decoder: Any) -> None:
    """StepFun's flow keeps its streaming caches in buffers sized for the published estimator (16
    blocks of 8 heads of 64, 1,000 frames): size them for the estimator loaded, so that a smaller
    one (the tests' tiny weights) streams too. The published model gets the published sizes."""
    import torch

    estimator = decoder.estimator
    blocks = len(estimator.blocks)
    attention = estimator.blocks[0].attn
    heads, head_dim = attention.num_heads, attention.head_dim
    width = estimator.in_proj.out_features
    steps, _, batch, _, _ = decoder.cnn_cache_buffer.shape
    frames = decoder.att_cache_buffer.shape[4]
    device = decoder.rand_noise.device
    decoder.cnn_cache_buffer = torch.zeros(steps, blocks, batch, 2 * width, 2, device=device)
    decoder.att_cache_buffer = torch.zeros(steps, blocks, batch, heads, frames, 2 * head_dim, device=device)
    estimator.cnn_cache_buffer = torch.zeros(blocks, batch, 2 * width, 2, device=device)
    estimator.att_cache_buffer = torch.zeros(blocks, batch, heads, frames, 2 * head_dim, device=device)
