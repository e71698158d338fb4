"""Step-Audio's dual-codebook audio tokenizer, streaming, with the reference's codes.

What StepFun's reference (`tokenizer.py` of stepfun-ai/Step-Audio) computes for an utterance, and
so what the LM must receive: the audio divided by max(peak, 0.01) and scaled to 0.999; vq02
(linguistic, 16.7 Hz, 1024 codes): FunASR's streaming Paraformer encoder run per 240 ms chunk, each
chunk keeping its own newest frames (as many as the chunk added, with no look-ahead), each 512-d
frame mapped to the nearest k-means centroid; vq06 (semantic, 25 Hz, 4096 codes): CosyVoice's
`speech_tokenizer_v1.onnx` over 128-bin Whisper-style log-mel of windows of up to 30 s (full
attention: every code depends on its whole window). The two are interleaved 2:3 (120 ms a group).

Streaming cannot know the utterance's peak before it ends, nor run vq06 on a window before it is
whole; see `StepAudioStream` for what is done early and what is redone.
"""

from __future__ import annotations

import asyncio
import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np
import structlog

from runtime.audio import SAMPLE_RATE as RATE
from runtime.audio import to_float
from runtime.audio_tokens import AUDIO_ID_BASE, VQ02_SIZE
from runtime.sinc_resample import resample
from runtime.tasks import TaskOwner
from runtime.workers import ModelWorker
from streaming_tokenizer.base import PartialCallback, StableCallback, UtteranceInput

log = structlog.get_logger(__name__)

PARAFORMER_DIR = "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
# chunk_size [0, 4, 5]: 4 encoder frames of 60 ms per chunk, 5 frames (300 ms) of look-ahead.
CHUNK_SIZE = (0, 4, 5)
ENCODER_LOOK_BACK = 4
DECODER_LOOK_BACK = 1
CHUNK_SAMPLES = CHUNK_SIZE[1] * 960  # 240 ms
SHORTEST_TAIL = 480  # a last piece shorter than this may give the fbank nothing: it is dropped
MEL_HOP = 160
VQ06_WINDOW = 30 * RATE  # the reference's longest vq06 window
VQ06_SHORTEST = 480  # the reference drops a window shorter than this
PEAK = 0.999
PEAK_FLOOR = 0.01  # quieter audio is not amplified past 99.9x


def energy_normalize(audio: np.ndarray, peak: float) -> np.ndarray:
    """The reference's normalization, in its order of operations: audio / max(peak, 0.01) * 0.999."""
    return audio / max(peak, PEAK_FLOOR) * PEAK


def trim_silence(audio: np.ndarray, rate: int = RATE) -> np.ndarray:
    """The reference's trim of a voice prompt: keep from 50 ms before the first sound (top_db 20,
    frames of 512 and hop 128) for the sounding span rounded up to 15 ms steps plus 270 ms, padding
    with zeros where the audio is shorter."""
    import librosa

    _, (start, end) = librosa.effects.trim(audio, top_db=20, frame_length=512, hop_length=128)
    step, before, after = 240, int(0.05 * rate), int(0.22 * rate)
    length = int(math.ceil((end - start) / step) * step + before + after)
    first = start - before
    out = audio[first:] if first > 0 else np.concatenate([np.zeros(-first, dtype=audio.dtype), audio])
    if len(out) >= length:
        return out[:length]
    return np.concatenate([out, np.zeros(length - len(out), dtype=audio.dtype)])


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
        return cache

    def _encode_chunk(self, samples: np.ndarray, cache: dict, final: bool) -> list[int]:
        """The codes of one chunk: the encoder sees [cached look-ahead frames, the chunk's frames],
        and the chunk keeps its own newest frames, as many as it added (the reference's rule: no
        frame waits for its look-ahead). The last piece of an utterance flushes the fbank."""
        import torch
        from funasr.utils.load_utils import extract_fbank

        if final and len(samples) == 0:
            return []
        with torch.inference_mode():
            try:
                speech, lengths = extract_fbank(
                    [torch.from_numpy(samples)], frontend=self.frontend, cache=cache["frontend"], is_final=final
                )
            except Exception:
                if final and len(samples) < SHORTEST_TAIL:
                    return []
                raise
            added = int(lengths[0])
            if added == 0:
                return []
            encoded, _ = self.paraformer.encode_chunk(
                speech.to(self.device), lengths.to(self.device), cache=cache, is_final=final
            )
            frames = encoded[0, -added:].float()
            return torch.cdist(frames, self.centroids).argmin(dim=1).tolist()

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
        """vq06 codes of normalized 16 kHz float audio, in windows of at most 30 s."""
        codes: list[int] = []
        for start in range(0, len(audio), VQ06_WINDOW):
            piece = audio[start : start + VQ06_WINDOW]
            if len(piece) < VQ06_SHORTEST:
                continue
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
    def tokenize(self, audio: np.ndarray, rate: int, trim: bool = False) -> DualCodes:
        """Offline, the reference's way: one utterance at any rate (8 kHz telephony is upsampled,
        where the reference refuses it), normalized by its own peak, optionally trimmed of silence
        (as the reference does for voice prompts), vq02 chunk by chunk and vq06 in one window."""
        audio = to_float(audio)
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if rate != RATE:  # as the reference resamples (torchaudio's sinc), so that prompts get its codes
            audio = resample(audio, rate, RATE)
        audio = energy_normalize(audio, float(np.abs(audio).max()) if len(audio) else 0.0)
        if trim and len(audio):
            audio = trim_silence(audio)
        vq02 = self.linguistic_stream().flush(audio)
        return DualCodes(tuple(vq02), tuple(self.semantic_codes(audio)))

    def prompt_ids(self, audio: np.ndarray, rate: int) -> list[int]:
        """A voice prompt's token IDs, as TTS-3B prompts carry them: trimmed of silence first."""
        return self.tokenize(audio, rate, trim=True).ids()


class LinguisticStream:
    """One utterance's vq02 state: the Paraformer caches and the samples short of a whole chunk."""

    def __init__(self, tokenizer: StepAudioTokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache = tokenizer._new_cache()
        self._pending = np.zeros(0, dtype=np.float32)

    def push(self, audio: np.ndarray) -> list[int]:
        """Codes of every whole 240 ms chunk now available (4 a chunk)."""
        self._pending = np.concatenate([self._pending, audio])
        codes: list[int] = []
        while len(self._pending) >= CHUNK_SAMPLES:
            chunk, self._pending = self._pending[:CHUNK_SAMPLES], self._pending[CHUNK_SAMPLES:]
            codes += self._tokenizer._encode_chunk(chunk, self._cache, final=False)
        return codes

    def flush(self, audio: np.ndarray) -> list[int]:
        """The codes of `audio` and of the partial chunk still held, as if the utterance ended here. Runs on a copy of the state, so the stream can take more audio
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

    The codes must be the reference's offline codes of the whole utterance, whose gain depends on
    its peak. A single pump task per utterance runs vq02 on each whole 240 ms chunk as it comes,
    with the gain of the peak heard so far; when a louder sample raises the peak, the codes so far
    are stale and the pump starts the utterance over with the new gain, while the user is still
    speaking. vq06 attends over its whole window, so it runs once the window is known: each whole
    30 s window during speech, the rest at finalize(). finalize() waits for the pump and then
    computes the vq02 tail and the open vq06 window (and anything a late peak made stale).
    `transcriber`, when given, turns the `<audio_N>` text into the transcript the history keeps
    (Step-Audio keeps earlier turns as text); the Controller runs it beside the reply.
    """

    def __init__(self, tokenizer: StepAudioTokenizer, worker: ModelWorker, transcriber: Transcriber | None = None) -> None:
        self._tokenizer = tokenizer
        self._worker = worker
        self._transcriber = transcriber
        # finalize() redoes a failed pump's work and raises to the Controller; the log says why.
        self._tasks = TaskOwner("stepaudio.tokenizer", _log_failure)
        self._pump: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.restarts = 0  # times this utterance's codes went stale because its peak rose
        self._audio: list[np.ndarray] = []
        self._samples = 0
        self._peak = 0.0  # of every sample received
        self._gain_peak = -1.0  # the peak the codes below were computed with
        self._stream = self._tokenizer.linguistic_stream()
        self._vq02_fed = 0  # samples handed to the vq02 stream
        self._vq02: list[int] = []
        self._vq06: list[int] = []
        self._vq06_done = 0  # samples covered by whole 30 s windows
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()  # this session's: the pump and finalize() take turns

    def begin(
        self, frames: tuple[np.ndarray, ...], on_partial: PartialCallback | None = None, on_stable: StableCallback | None = None
    ) -> None:
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
        if len(audio):
            self._peak = max(self._peak, float(np.abs(audio).max()))

    def _utterance(self) -> np.ndarray:
        if len(self._audio) > 1:
            self._audio = [np.concatenate(self._audio)]
        return self._audio[0] if self._audio else np.zeros(0, dtype=np.float32)

    async def _run_pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._busy:
                await self._catch_up()

    def _regain(self) -> None:
        """Start over when the peak has changed since the codes were computed."""
        if self._gain_peak == max(self._peak, PEAK_FLOOR):
            return
        if self._vq02_fed or self._vq06_done:
            self.restarts += 1
            log.info("stepaudio.tokenizer_restarted", seconds=round(self._vq02_fed / RATE, 2))
        self._gain_peak = max(self._peak, PEAK_FLOOR)
        self._stream = self._tokenizer.linguistic_stream()
        self._vq02_fed, self._vq02, self._vq06_done, self._vq06 = 0, [], 0, []

    async def _catch_up(self) -> None:
        audio = self._utterance()
        self._regain()
        peak = self._gain_peak
        whole = (len(audio) - self._vq02_fed) // CHUNK_SAMPLES * CHUNK_SAMPLES
        if whole:
            piece = energy_normalize(audio[self._vq02_fed : self._vq02_fed + whole], peak)
            self._vq02_fed += whole
            self._vq02 += await self._worker.run(self._stream.push, piece)
        while len(audio) - self._vq06_done > VQ06_WINDOW:  # a window is whole once more audio came
            window = energy_normalize(audio[self._vq06_done : self._vq06_done + VQ06_WINDOW], peak)
            self._vq06 += await self._worker.run(self._tokenizer.semantic_codes, window)
            self._vq06_done += VQ06_WINDOW

    async def drained(self) -> None:
        """Return once every whole chunk and window fed so far is tokenized (where a live call's
        pump is after each 240 ms; tests and benchmarks use it to stand for that)."""
        async with self._busy:
            await self._catch_up()

    async def finalize(self) -> UtteranceInput:
        async with self._busy:
            await self._catch_up()
            audio = self._utterance()
            peak, stream = self._gain_peak, self._stream
            rest, vq06_audio = audio[self._vq02_fed :], audio[self._vq06_done :]

            def tail() -> tuple[list[int], list[int]]:
                return stream.flush(energy_normalize(rest, peak)), self._tokenizer.semantic_codes(
                    energy_normalize(vq06_audio, peak)
                )

            vq02_tail, vq06_tail = await self._worker.run(tail)
            codes = DualCodes(tuple(self._vq02 + vq02_tail), tuple(self._vq06 + vq06_tail))
        content = codes.text()
        log.info(
            "stepaudio.tokenized",
            seconds=round(len(audio) / RATE, 2),
            vq02=len(codes.vq02),
            vq06=len(codes.vq06),
            tokens=len(codes.interleaved()),
            restarts=self.restarts,
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
