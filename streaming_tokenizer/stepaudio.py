"""Step-Audio's dual-codebook audio tokenizer, streaming.

vq02 (linguistic, 16.7 Hz, 1024 codes): FunASR's streaming Paraformer encoder, run per 240 ms chunk
with the session's own encoder cache, each 512-d frame mapped to the nearest k-means centroid.
vq06 (semantic, 25 Hz, 4096 codes): CosyVoice's `speech_tokenizer_v1.onnx` over 128-bin
Whisper-style log-mel, run on fixed windows as soon as each fills, so that finalize() only computes
the open tail. The two are interleaved 2:3 (one group per 120 ms).
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import soxr
import structlog

from runtime.audio import SAMPLE_RATE as RATE
from runtime.audio import to_float
from runtime.audio_tokens import AUDIO_ID_BASE, VQ02_SIZE
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.base import PartialCallback, UtteranceInput

log = structlog.get_logger(__name__)

PARAFORMER_DIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
# chunk_size [0, 4, 5]: 4 encoder frames of 60 ms per chunk, 5 frames (300 ms) of look-ahead.
CHUNK_SIZE = (0, 4, 5)
ENCODER_LOOK_BACK = 4
DECODER_LOOK_BACK = 1
CHUNK_SAMPLES = CHUNK_SIZE[1] * 960  # 240 ms
MEL_HOP = 160
VQ06_HOP_SAMPLES = 4 * MEL_HOP  # one vq06 code per 40 ms
VQ06_MAX_WINDOW_S = 30.0  # the reference runs the full-attention tokenizer on at most 30 s
PEAK = 0.999


@dataclass(frozen=True)
class DualCodes:
    """One utterance's codes: vq02 in 0..1023, vq06 in 0..4095."""

    vq02: tuple[int, ...]
    vq06: tuple[int, ...]

    def interleaved(self) -> list[tuple[int, int]]:
        """(stream, code) pairs in groups [vq02 x2, vq06 x3]; trailing partial groups dropped."""
        groups = min(len(self.vq02) // 2, len(self.vq06) // 3)
        out: list[tuple[int, int]] = []
        for g in range(groups):
            out += [(2, c) for c in self.vq02[2 * g : 2 * g + 2]]
            out += [(6, c) for c in self.vq06[3 * g : 3 * g + 3]]
        return out

    def text(self) -> str:
        """What the Chat LM reads: `<audio_N>` with vq02 -> N = c, vq06 -> N = 1024 + c."""
        return "".join(f"<audio_{c if s == 2 else VQ02_SIZE + c}>" for s, c in self.interleaved())

    def ids(self) -> list[int]:
        """Token IDs for TTS-3B prompts: 65536 + the text form's N."""
        return [AUDIO_ID_BASE + (c if s == 2 else VQ02_SIZE + c) for s, c in self.interleaved()]


class StepAudioTokenizer:
    """Owns the loaded models of `Step-Audio-Tokenizer/` (shared by every session, stateless: each
    session's streaming state lives in its own `LinguisticStream`)."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int = 2) -> None:
        import onnxruntime
        import torch
        from funasr import AutoModel

        self.device = device
        auto = AutoModel(
            model=str(directory / PARAFORMER_DIR),
            device=device,
            disable_update=True,
            disable_pbar=True,
            disable_log=True,
            ncpu=threads,
        )
        self.paraformer = auto.model
        self.frontend = auto.kwargs["frontend"]
        self._cache_kwargs = {
            "chunk_size": list(CHUNK_SIZE),
            "encoder_chunk_look_back": ENCODER_LOOK_BACK,
            "decoder_chunk_look_back": DECODER_LOOK_BACK,
            "encoder_conf": auto.kwargs["encoder_conf"],
            "frontend_conf": auto.kwargs["frontend_conf"],
        }
        centroids = np.load(directory / "linguistic_tokenizer.npy").astype(np.float32)
        if centroids.shape[0] != VQ02_SIZE:
            raise ValueError(f"linguistic_tokenizer.npy has {centroids.shape[0]} centroids, expected {VQ02_SIZE}")
        self.centroids = torch.from_numpy(centroids).to(device)
        self._centroid_norms = (self.centroids**2).sum(dim=1)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        available = set(onnxruntime.get_available_providers())
        self.vq06_session = onnxruntime.InferenceSession(
            str(directory / "speech_tokenizer_v1.onnx"), options, providers=[p for p in providers if p in available]
        )
        self._mel_filters = _mel_filters(128)

    # -- vq02 ---------------------------------------------------------------------------------
    def linguistic_stream(self) -> LinguisticStream:
        return LinguisticStream(self)

    def _new_cache(self) -> dict:
        cache: dict = {}
        self.paraformer.init_cache(cache, **self._cache_kwargs)
        # The encoder's overlap buffer starts as zero frames: the first outputs are those, not speech.
        cache["padding_frames"] = CHUNK_SIZE[0] + CHUNK_SIZE[2]
        return cache

    def _encode_chunk(self, samples: np.ndarray, cache: dict, final: bool) -> list[int]:
        import torch
        from funasr.utils.load_utils import extract_fbank

        with torch.inference_mode():
            if final and len(samples) < 960:
                # Less than one 60 ms frame left: the encoder flushes the look-ahead it holds.
                cache["encoder"]["tail_chunk"] = True
                speech = cache["encoder"]["feats"]
                lengths = torch.tensor([speech.shape[1]], dtype=torch.int64)
            else:
                speech, lengths = extract_fbank(
                    [torch.from_numpy(samples)], frontend=self.frontend, cache=cache["frontend"], is_final=final
                )
            if speech.shape[1] == 0:
                return []
            encoded, _ = self.paraformer.encode_chunk(
                speech.to(self.device), lengths.to(self.device), cache=cache, is_final=final
            )
            # The encoder sees [look-back, chunk, look-ahead]; the chunk's frames are final now, the
            # look-ahead's come with the next chunk, except at the end of the utterance.
            end = None if final else CHUNK_SIZE[0] + CHUNK_SIZE[1]
            frames = encoded[0, CHUNK_SIZE[0] : end].float()
            skip = min(cache["padding_frames"], frames.shape[0])
            cache["padding_frames"] -= skip
            frames = frames[skip:]
            if frames.shape[0] == 0:
                return []
            distances = self._centroid_norms[None, :] - 2.0 * frames @ self.centroids.T
            return distances.argmin(dim=1).tolist()

    # -- vq06 ---------------------------------------------------------------------------------
    def log_mel(self, audio: np.ndarray) -> np.ndarray:
        """Whisper-style 128-bin log-mel (n_fft 400, hop 160, Hann, log10, 8 dB floor below the peak)."""
        import torch

        wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        spectrum = torch.stft(wave, 400, MEL_HOP, window=torch.hann_window(400), return_complex=True)
        power = spectrum[:, :-1].abs() ** 2
        mel = torch.from_numpy(self._mel_filters) @ power
        logmel = torch.clamp(mel, min=1e-10).log10()
        logmel = torch.maximum(logmel, logmel.max() - 8.0)
        return ((logmel + 4.0) / 4.0).numpy()

    def semantic_codes(self, audio: np.ndarray) -> list[int]:
        """vq06 codes of 16 kHz float audio, in windows of at most 30 s."""
        codes: list[int] = []
        step = int(VQ06_MAX_WINDOW_S * RATE)
        for start in range(0, len(audio), step):
            piece = audio[start : start + step]
            if len(piece) < VQ06_HOP_SAMPLES:
                break
            feats = self.log_mel(piece)[None].astype(np.float32)
            out = self.vq06_session.run(
                None,
                {
                    self.vq06_session.get_inputs()[0].name: feats,
                    self.vq06_session.get_inputs()[1].name: np.array([feats.shape[2]], dtype=np.int32),
                },
            )[0]
            codes += [int(c) for c in np.asarray(out).reshape(-1)]
        return codes

    # -- whole utterances ---------------------------------------------------------------------
    def tokenize(self, audio: np.ndarray, rate: int) -> DualCodes:
        """Offline: one utterance at any rate (8 kHz telephony included), through the same streaming
        path a live session takes, so both give the same codes."""
        audio = to_float(audio)
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != RATE:
            audio = soxr.resample(audio, rate, RATE).astype(np.float32)
        peak = float(np.abs(audio).max()) if len(audio) else 0.0
        if peak > 0:
            audio = audio * (PEAK / peak)
        vq02 = self.linguistic_stream().flush(audio)
        return DualCodes(tuple(vq02), tuple(self.semantic_codes(audio)))

    def audio_ids(self, audio: np.ndarray, rate: int) -> list[int]:
        """Offline: one utterance's token IDs, as TTS-3B prompts carry a voice's audio."""
        return self.tokenize(audio, rate).ids()


class LinguisticStream:
    """One utterance's vq02 state: the Paraformer caches and the samples short of a whole chunk."""

    def __init__(self, tokenizer: StepAudioTokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache = tokenizer._new_cache()
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, audio: np.ndarray) -> list[int]:
        """Codes of every whole 240 ms chunk now available (4 per chunk once the look-ahead fills)."""
        self._pending = np.concatenate([self._pending, audio])
        codes: list[int] = []
        while len(self._pending) >= CHUNK_SAMPLES:
            chunk, self._pending = self._pending[:CHUNK_SAMPLES], self._pending[CHUNK_SAMPLES:]
            codes += self._tokenizer._encode_chunk(chunk, self._cache, final=False)
        return codes

    def flush(self, audio: np.ndarray) -> list[int]:
        """The codes of `audio` and of everything still held (partial chunk, look-ahead), as if the
        utterance ended here. Runs on a copy of the state, so the stream can take more audio
        afterwards (a finalize that the user's resumed speech invalidated)."""
        fork = LinguisticStream.__new__(LinguisticStream)
        fork._tokenizer, fork._cache, fork._pending = self._tokenizer, copy.deepcopy(self._cache), self._pending
        codes = fork.push(audio)
        return codes + self._tokenizer._encode_chunk(fork._pending, fork._cache, final=True)


def _mel_filters(n_mels: int) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=RATE, n_fft=400, n_mels=n_mels).astype(np.float32)


Transcriber = Callable[[str], Awaitable[str]]


class StepAudioStream:
    """One session's tokenizer (the StreamingTokenizer the Controller drives).

    A single pump task per utterance runs the models in the worker, in order: vq02 on each whole
    240 ms chunk, vq06 on each full window. finalize() waits for the pump, then computes only what
    is left (the vq02 flush and the vq06 tail). `transcriber`, when given, turns the `<audio_N>` text
    into the transcript the history keeps (Step-Audio keeps earlier turns as text); the Controller
    runs it beside the reply, not before it.
    """

    def __init__(
        self,
        tokenizer: StepAudioTokenizer,
        worker: ModelWorker,
        window_s: float = 4.8,
        transcriber: Transcriber | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._worker = worker
        self._window = max(VQ06_HOP_SAMPLES, int(window_s * RATE) // VQ06_HOP_SAMPLES * VQ06_HOP_SAMPLES)
        self._transcriber = transcriber
        # finalize() redoes a failed pump's work and raises to the Controller; the log says why.
        self._tasks = TaskOwner("stepaudio.tokenizer", _log_failure)
        self._pump: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._audio: list[np.ndarray] = []
        self._samples = 0
        self._peak = 0.0
        self._stream = self._tokenizer.linguistic_stream()
        self._vq02_fed = 0  # samples handed to the vq02 stream
        self._vq02: list[int] = []
        self._vq06: list[int] = []
        self._vq06_done = 0  # samples covered by committed vq06 windows
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()  # this session's: the pump and finalize() take turns

    def begin(self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None) -> None:
        # A call still running in the worker for the previous utterance only touches its old state.
        self._stop_pump()
        self._reset()
        for frame in frames:
            self._append(frame)
        self._pump = self._tasks.spawn(self._run_pump(), "pump")
        self._wake.set()

    def feed(self, frame: np.ndarray, voiced: bool) -> None:
        self._append(frame)
        if self._samples - self._vq02_fed >= CHUNK_SAMPLES:
            self._wake.set()

    def _append(self, frame: np.ndarray) -> None:
        audio = to_float(frame)
        self._audio.append(audio)
        self._samples += len(audio)

    def _utterance(self) -> np.ndarray:
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        return self._audio[0] if self._audio else np.zeros(0, dtype=np.float32)

    def _gain(self, audio: np.ndarray) -> float:
        # Peak normalization without the future: the running peak of the utterance so far.
        if len(audio):
            self._peak = max(self._peak, float(np.abs(audio).max()))
        return PEAK / self._peak if self._peak > 0 else 1.0

    async def _run_pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._busy:
                await self._catch_up()

    async def _catch_up(self) -> None:
        audio = self._utterance()
        whole = (len(audio) - self._vq02_fed) // CHUNK_SAMPLES * CHUNK_SAMPLES
        if whole:
            piece = audio[self._vq02_fed : self._vq02_fed + whole]
            piece = piece * self._gain(piece)
            self._vq02_fed += whole
            self._vq02 += await self._worker.run(self._stream.push, piece)
        while len(audio) - self._vq06_done >= self._window:
            window = audio[self._vq06_done : self._vq06_done + self._window]
            self._vq06 += await self._worker.run(self._tokenizer.semantic_codes, window * self._gain(window))
            self._vq06_done += self._window

    async def drained(self) -> None:
        """Return once every whole chunk and window fed so far is tokenized (where a live call's
        pump is after each 240 ms; tests and benchmarks use it to stand for that)."""
        async with self._busy:
            await self._catch_up()

    async def finalize(self) -> UtteranceInput:
        async with self._busy:
            await self._catch_up()
            audio = self._utterance()
            rest = audio[self._vq02_fed :]
            gain = self._gain(rest)
            stream, vq06_audio = self._stream, audio[self._vq06_done :]

            def tail() -> tuple[list[int], list[int]]:
                return stream.flush(rest * gain), self._tokenizer.semantic_codes(vq06_audio * gain)

            vq02_tail, vq06_tail = await self._worker.run(tail)
            codes = DualCodes(tuple(self._vq02 + vq02_tail), tuple(self._vq06 + vq06_tail))
        content = codes.text()
        log.info(
            "stepaudio.tokenized",
            seconds=round(len(audio) / RATE, 2),
            vq02=len(codes.vq02),
            vq06=len(codes.vq06),
            tokens=len(codes.interleaved()),
        )
        if not content:
            return UtteranceInput("")
        transcriber = self._transcriber
        return UtteranceInput("", content, (lambda: transcriber(content)) if transcriber else None)

    def _stop_pump(self) -> None:
        self._tasks.cancel(self._pump)
        self._pump = None

    async def aclose(self) -> None:
        self._stop_pump()
        await self._tasks.aclose()


def _log_failure(task: asyncio.Task[None], exc: BaseException) -> None:
    log.error("stepaudio.tokenizer_failed", error=repr(exc))
