"""Speech tokens -> 22,050 Hz audio with CosyVoice's flow matching and HiFT vocoder, streaming.

The model classes, their caches and the cross-fade come from the `cosyvoice` package
(cosyvoice-minicpmo). Its own streaming driver (`cosyvoice.cli.model`) cannot be imported here: it
imports torchaudio at module level, and torchaudio has no build for this project's torch. The
driver below follows the same known-good pattern: decode token chunks that grow (about 0.6 s, 1 s,
then 2 s) with 20 tokens of look-ahead, keep the flow's noise/condition cache across chunks,
cross-fade the mel overlap, and feed the vocoder its mel and source caches with a cross-fade of the
speech, so that the first audio needs the first chunk only.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 22050
MEL_HOP = 256
OVERLAP_TOKENS = 20  # the length regulator interpolates the first and last 20 tokens separately
FLOW_CACHE_FRAMES = 34  # the flow keeps its last 34 frames of noise and condition for the next call
MEL_CACHE_FRAMES = 20
XVECTOR_RATE = 16000  # CAM++ takes 80-bin fbank of 16 kHz audio
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * MEL_HOP
CHUNK_SECONDS = (0.6, 1.0, 2.0)  # then 2 s per chunk


def import_cosyvoice() -> None:
    """Make the flow/HiFT modules importable without torchaudio.

    `cosyvoice.transformer.encoder` reaches `cosyvoice.utils.file_utils`, which imports torchaudio
    at module level for wav I/O that this project never calls, and torchaudio has no build for this
    torch. Where it is missing, a module that says so and raises on any use takes its name.
    transformers is imported first: it records at import whether torchaudio exists, and must see
    the truth."""
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return
    import transformers  # noqa: F401

    absent = types.ModuleType("torchaudio", "not installed: cosyvoice's wav I/O is not used here")

    def missing(attribute: str) -> None:
        raise AttributeError(f"torchaudio.{attribute}: torchaudio is not installed")

    absent.__getattr__ = missing  # type: ignore[attr-defined]
    sys.modules["torchaudio"] = absent


def _model_sections(yaml_text: str, keep: tuple[str, ...] = ("flow", "hift", "feat_extractor")) -> str:
    """The YAML's plain top-level settings plus the `keep` sections: the training pipeline and LM
    sections would import modules (and their dependencies) this decoder never uses."""
    blocks: list[list[str]] = []
    for line in yaml_text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            blocks.append([line])
        elif blocks:
            blocks[-1].append(line)
    kept = []
    for block in blocks:
        key = block[0].split(":", 1)[0].strip()
        text = "\n".join(block)
        if key in keep or not re.search(r"!(new|name|apply):", text):
            kept.append(text)
    return "\n".join(kept) + "\n"


@dataclass
class VoiceCondition:
    """What the flow is conditioned on for one voice: the prompt's speech tokens, its mel, and the
    speaker's x-vector."""

    tokens: "object"  # torch int32 (1, n)
    mel: "object"  # torch float (1, frames, 80)
    embedding: "object"  # torch float (1, 192)


class CosyVoiceDecoder:
    """Owns one CosyVoice model directory (`cosyvoice.yaml`, `flow.pt`, `hift.pt`, `campplus.onnx`)
    loaded on one device. Stateless between calls: each utterance decodes in its own `DecodeStream`."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int = 2) -> None:
        import_cosyvoice()
        import onnxruntime
        import torch
        from hyperpyyaml import load_hyperpyyaml

        self.directory = directory
        self.device = torch.device(device)
        configs = load_hyperpyyaml(_model_sections((directory / "cosyvoice.yaml").read_text()))
        self.flow, self.hift = configs["flow"], configs["hift"]
        # The prompt's mel as the model was trained on it: the yaml's own feature extractor when
        # it names one, else the flow's mel settings.
        self._mel = configs.get("feat_extractor")
        self.flow.load_state_dict(torch.load(directory / "flow.pt", map_location=self.device), strict=True)
        hift_state = torch.load(directory / "hift.pt", map_location=self.device)
        self.hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
        self.flow.to(self.device).eval()
        self.hift.to(self.device).eval()
        self.token_rate = float(self.flow.input_frame_rate)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self._campplus = onnxruntime.InferenceSession(
            str(directory / "campplus.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def mel_frames(self, tokens: int) -> int:
        return int(tokens / self.token_rate * SAMPLE_RATE / MEL_HOP)

    def condition(self, prompt_wav: np.ndarray, rate: int, prompt_tokens: list[int]) -> VoiceCondition:
        """The flow's conditioning for a voice prompt (float audio at `rate`, its flow tokens)."""
        import kaldi_native_fbank as knf
        import soxr
        import torch
        audio16 = soxr.resample(prompt_wav, rate, XVECTOR_RATE).astype(np.float32) if rate != XVECTOR_RATE else prompt_wav
        audio22 = soxr.resample(prompt_wav, rate, SAMPLE_RATE).astype(np.float32)
        # CAM++ x-vector: Kaldi fbank, mean-normalized over time.
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.samp_freq = XVECTOR_RATE
        opts.mel_opts.num_bins = 80
        fbank = knf.OnlineFbank(opts)
        fbank.accept_waveform(XVECTOR_RATE, (audio16 * 32768.0).tolist())
        fbank.input_finished()
        feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
        feats -= feats.mean(axis=0, keepdims=True)
        embedding = self._campplus.run(None, {self._campplus.get_inputs()[0].name: feats[None]})[0]
        mel = self.prompt_mel(torch.from_numpy(audio22)[None]).transpose(1, 2)
        # The prompt's mel and tokens must cover the same time: trim both to the shorter.
        usable = min(len(prompt_tokens), int(mel.shape[1] * MEL_HOP / SAMPLE_RATE * self.token_rate))
        mel = mel[:, : self.mel_frames(usable)]
        return VoiceCondition(
            torch.tensor([prompt_tokens[:usable]], dtype=torch.int32),
            mel.float(),
            torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(1, -1)),
        )

    def prompt_mel(self, audio22: "object") -> "object":
        """(1, 80, frames) mel of 22,050 Hz audio (1, samples)."""
        if self._mel is not None:
            return self._mel(audio22)
        from matcha.utils.audio import mel_spectrogram

        conf = self.flow.mel_feat_conf
        return mel_spectrogram(
            audio22,
            n_fft=conf["n_fft"],
            num_mels=conf["num_mels"],
            sampling_rate=conf["sampling_rate"],
            hop_size=conf["hop_size"],
            win_size=conf["win_size"],
            fmin=conf["fmin"],
            fmax=conf["fmax"],
            center=False,
        )

    def stream(self, voice: VoiceCondition) -> DecodeStream:
        return DecodeStream(self, voice)

    def decode_offline(self, voice: VoiceCondition, tokens: list[int]) -> np.ndarray:
        """All tokens in one flow and one vocoder call (the reference's non-streaming path)."""
        stream = self.stream(voice)
        return stream.finish(tokens)


class DecodeStream:
    """One utterance's decoding state: tokens not yet spoken, the flow cache, the mel overlap and the
    vocoder's caches. push() takes the tokens generated so far and returns the audio now final."""

    def __init__(self, decoder: CosyVoiceDecoder, voice: VoiceCondition) -> None:
        import torch

        self._decoder = decoder
        self._voice = voice
        self._tokens: list[int] = []
        self._offset = 0  # tokens already turned into audio
        self._chunks = 0
        self._flow_cache = torch.zeros(1, 80, 0, 2)
        self._mel_overlap = torch.zeros(1, 80, 0)
        self._hift_cache: dict | None = None
        self._mel_overlap_frames = decoder.mel_frames(OVERLAP_TOKENS)
        # Tensors, not numpy arrays: fade_in_out multiplies them with torch tensors.
        self._mel_window = torch.from_numpy(np.hamming(2 * self._mel_overlap_frames)).float()
        self._speech_window = torch.from_numpy(np.hamming(2 * SOURCE_CACHE_SAMPLES)).float()

    def _hop(self) -> int:
        seconds = CHUNK_SECONDS[min(self._chunks, len(CHUNK_SECONDS) - 1)]
        return max(1, round(seconds * self._decoder.token_rate))

    def ready(self, pending: int) -> bool:
        """Whether `pending` more tokens would complete the next chunk (with its look-ahead)."""
        return len(self._tokens) + pending - self._offset >= self._hop() + OVERLAP_TOKENS

    def push(self, tokens: list[int]) -> list[np.ndarray]:
        self._tokens.extend(tokens)
        out = []
        while len(self._tokens) - self._offset >= self._hop() + OVERLAP_TOKENS:
            hop = self._hop()
            out.append(self._decode(self._tokens[self._offset : self._offset + hop + OVERLAP_TOKENS], final=False))
            self._offset += hop
            self._chunks += 1
        return out

    def finish(self, tokens: list[int] = ()) -> np.ndarray:  # type: ignore[assignment]
        self._tokens.extend(tokens)
        rest = self._tokens[self._offset :]
        self._offset = len(self._tokens)
        if not rest:
            return np.zeros(0, dtype=np.float32)
        return self._decode(rest, final=True)

    def _decode(self, tokens: list[int], final: bool) -> np.ndarray:
        return self.vocode(self.flow(tokens, final), final)

    def flow(self, tokens: list[int], final: bool) -> "object":
        """Mel frames (1, 80, n) of one token chunk: the flow continues from its cache, the head is
        cross-faded with the previous chunk's look-ahead, and (unless final) this chunk's look-ahead
        is held back for the next one."""
        import torch
        from cosyvoice.utils.common import fade_in_out

        decoder, voice, device = self._decoder, self._voice, self._decoder.device
        token = torch.tensor([tokens], dtype=torch.int32)
        with torch.inference_mode():
            mel, self._flow_cache = decoder.flow.inference(
                token=token.to(device),
                token_len=torch.tensor([token.shape[1]], dtype=torch.int32).to(device),
                prompt_token=voice.tokens.to(device),
                prompt_token_len=torch.tensor([voice.tokens.shape[1]], dtype=torch.int32).to(device),
                prompt_feat=voice.mel.to(device),
                prompt_feat_len=torch.tensor([voice.mel.shape[1]], dtype=torch.int32).to(device),
                embedding=voice.embedding.to(device),
                flow_cache=self._flow_cache,
            )
        mel = mel.cpu()
        if self._mel_overlap.shape[2]:
            mel = fade_in_out(mel, self._mel_overlap, self._mel_window)
        if not final:
            # The look-ahead's mel is decoded again, better informed, by the next chunk.
            self._mel_overlap = mel[:, :, -self._mel_overlap_frames :]
            mel = mel[:, :, : -self._mel_overlap_frames]
        return mel

    def vocode(self, mel: "object", final: bool) -> np.ndarray:
        """Audio of the next mel frames: the vocoder restarts from its cached mel and source, its
        head is cross-faded with the speech it held back, and (unless final) it holds back its own
        tail for the next call."""
        import torch
        from cosyvoice.utils.common import fade_in_out

        device = self._decoder.device
        with torch.inference_mode():
            if self._hift_cache is not None:
                mel = torch.concat([self._hift_cache["mel"], mel], dim=2)
                source = self._hift_cache["source"]
            else:
                source = torch.zeros(1, 1, 0)
            speech, source = self._decoder.hift.inference(speech_feat=mel.to(device), cache_source=source.to(device))
            speech, source = speech.cpu(), source.cpu()
            if self._hift_cache is not None:
                speech = fade_in_out(speech, self._hift_cache["speech"], self._speech_window)
            if not final:
                self._hift_cache = {
                    "mel": mel[:, :, -MEL_CACHE_FRAMES:],
                    "source": source[:, :, -SOURCE_CACHE_SAMPLES:],
                    "speech": speech[:, -SOURCE_CACHE_SAMPLES:],
                }
                speech = speech[:, :-SOURCE_CACHE_SAMPLES]
        return speech[0].numpy().astype(np.float32)
