"""Speech tokens -> 22,050 Hz audio with CosyVoice's flow matching and HiFT vocoder, streaming.

The model classes and the cross-fade come from the `cosyvoice` package (cosyvoice-minicpmo). Its
own drivers do not fit: `cosyvoice.cli.model` imports torchaudio at module level (torchaudio has no
build for this project's torch), and its flow's `inference` differs from the one Step-Audio's
reference runs in two ways: its length regulator stretches the first and last 20 tokens apart from
the rest, and its cache keeps 34 mel frames of overlap, which is 20 tokens only at 50 Hz (at this
model's 41.67 Hz they span 41). So the flow is driven here, from its own modules: one pass over all
tokens stretches them in one piece, as the reference does; streaming decodes token chunks that grow
(about 0.6 s, 1 s, then 2 s) with 20 tokens of look-ahead, stretches each chunk's head and tail
apart so that the look-ahead lands on whole frames, carries the overlap's condition from one chunk
to the next, cross-fades the mel overlap, and feeds the vocoder its mel and source caches with a
cross-fade of the speech, so that the first audio needs the first chunk only. Both draw the flow's
noise from one fixed buffer per decoder, frame by frame, so that a streamed frame starts from the
noise its one-pass frame starts from.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.sinc_resample import resample

SAMPLE_RATE = 22050
MEL_HOP = 256
OVERLAP_TOKENS = 20  # each streamed chunk's look-ahead, decoded again at the head of the next
MEL_CACHE_FRAMES = 20
NOISE_SECONDS = 300  # the fixed noise buffer; longer speech reuses it from the start
NOISE_SEED = 0
# Module paths that Step-Audio's vendored CosyVoice uses in its yaml files, and where
# cosyvoice-minicpmo (and its matcha) keep the same function.
RENAMED_MODULES = {"cosyvoice.matcha.audio.": "matcha.utils.audio."}
XVECTOR_RATE = 16000  # CAM++ takes 80-bin fbank of 16 kHz audio
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * MEL_HOP
CHUNK_SECONDS = (0.6, 1.0, 2.0)  # then 2 s per chunk


def import_cosyvoice() -> None:
    """Make the flow/HiFT modules importable without torchaudio.

    `cosyvoice.transformer.encoder` reaches `cosyvoice.utils.file_utils`, which imports torchaudio
    at module level for wav I/O that this project never calls, and torchaudio has no build for this
    torch. Where it is missing, a module that says so and raises on any use takes its name (the top
    level only: FunASR looks for `torchaudio.compliance.kaldi` and computes its features itself
    when that import fails). transformers is imported first: it records at import whether
    torchaudio exists, and must see the truth."""
    if "torchaudio" in sys.modules or importlib.util.find_spec("torchaudio") is not None:
        return
    import transformers  # noqa: F401

    absent = types.ModuleType("torchaudio", "not installed: cosyvoice's wav I/O is not used here")

    def missing(attribute: str) -> None:
        raise AttributeError(f"torchaudio.{attribute}: torchaudio is not installed")

    absent.__getattr__ = missing  # type: ignore[attr-defined]
    sys.modules["torchaudio"] = absent


def resolve_dtype(dtype: str, device: str) -> "object":
    """A torch dtype from its name; `auto`: bfloat16 on a GPU (as the reference runs TTS-3B and the
    flow), float32 on the CPU."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _model_sections(yaml_text: str, keep: tuple[str, ...] = ("flow", "hift", "feat_extractor")) -> str:
    """The YAML's plain top-level settings plus the `keep` sections (the training pipeline and LM
    sections would import modules this decoder never uses), with Step-Audio's vendored module
    paths mapped to the installed ones."""
    for old, new in RENAMED_MODULES.items():
        yaml_text = yaml_text.replace(old, new)
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


def xvector_features(audio16: np.ndarray) -> np.ndarray:
    """CAM++'s input (frames, 80): Kaldi's 80-bin fbank of 16 kHz audio as [-1, 1] samples (the
    reference's scale: where the log floor is reached, in digital silence, another scale changes
    the features), mean-normalized over time."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = XVECTOR_RATE
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(XVECTOR_RATE, np.asarray(audio16, dtype=np.float32).tolist())
    fbank.input_finished()
    feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
    return feats - feats.mean(axis=0, keepdims=True)


class CosyVoiceDecoder:
    """Owns one CosyVoice model directory (`cosyvoice.yaml`, `flow.pt`, `hift.pt`, `campplus.onnx`)
    loaded on one device, and its noise buffer. Stateless between calls: each utterance decodes in
    its own `DecodeStream`."""

    def __init__(self, directory: Path, device: str = "cpu", threads: int = 2, dtype: "object" = None) -> None:
        import_cosyvoice()
        import onnxruntime
        import torch
        from hyperpyyaml import load_hyperpyyaml

        self.directory = directory
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32  # the flow's; the vocoder runs in float32
        configs = load_hyperpyyaml(_model_sections((directory / "cosyvoice.yaml").read_text()))
        self.flow, self.hift = configs["flow"], configs["hift"]
        # The prompt's mel as the model was trained on it: the yaml's own feature extractor when
        # it names one, else the flow's mel settings.
        self._mel = configs.get("feat_extractor")
        self.flow.load_state_dict(torch.load(directory / "flow.pt", map_location=self.device), strict=True)
        hift_state = torch.load(directory / "hift.pt", map_location=self.device)
        self.hift.load_state_dict({k.replace("generator.", ""): v for k, v in hift_state.items()}, strict=True)
        self.flow.to(self.device, self.dtype).eval()
        self.hift.to(self.device).eval()
        self.token_rate = float(self.flow.input_frame_rate)
        generator = torch.Generator().manual_seed(NOISE_SEED)
        frames = int(NOISE_SECONDS * SAMPLE_RATE / MEL_HOP)
        self.noise = torch.randn(1, self.flow.output_size, frames, generator=generator)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self._campplus = onnxruntime.InferenceSession(
            str(directory / "campplus.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def mel_frames(self, tokens: int) -> int:
        return int(tokens / self.token_rate * SAMPLE_RATE / MEL_HOP)

    def condition(self, prompt_wav: np.ndarray, rate: int, prompt_tokens: list[int]) -> VoiceCondition:
        """The flow's conditioning for a voice prompt (float audio at `rate`, its flow tokens). As in
        the reference, the mel and the x-vector are of the whole prompt, resampled as torchaudio
        does, while the tokens may be of its trimmed copy: the flow stretches the tokens over the
        mel's length."""
        import torch
        audio22 = resample(prompt_wav, rate, SAMPLE_RATE)
        feats = xvector_features(resample(prompt_wav, rate, XVECTOR_RATE))
        embedding = self._campplus.run(None, {self._campplus.get_inputs()[0].name: feats[None]})[0]
        mel = self.prompt_mel(torch.from_numpy(audio22)[None]).transpose(1, 2)
        return VoiceCondition(
            torch.tensor([prompt_tokens], dtype=torch.int32),
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

    def noise_at(self, start: int, frames: int) -> "object":
        """The buffer's noise for `frames` frames from frame `start` (wrapping around)."""
        import torch

        index = torch.arange(start, start + frames) % self.noise.shape[2]
        return self.noise[:, :, index]

    def stretch(self, h: "object", frames: int, split: bool) -> "object":
        """(1, 80, frames): token encodings (1, n, 80) stretched to mel frames by linear
        interpolation, in one piece (the reference), or (`split`, for a streamed chunk of more than
        40 tokens) with the first and last 20 tokens on exactly the frames 20 tokens span, so that
        the look-ahead a chunk shares with its neighbour covers the same frames in both."""
        import torch
        from torch.nn import functional as F

        x = h.transpose(1, 2)
        if not split or x.shape[2] <= 2 * OVERLAP_TOKENS:
            return F.interpolate(x, size=frames, mode="linear")
        edge = self.mel_frames(OVERLAP_TOKENS)
        return torch.concat(
            [
                F.interpolate(x[:, :, :OVERLAP_TOKENS], size=edge, mode="linear"),
                F.interpolate(x[:, :, OVERLAP_TOKENS:-OVERLAP_TOKENS], size=frames - 2 * edge, mode="linear"),
                F.interpolate(x[:, :, -OVERLAP_TOKENS:], size=edge, mode="linear"),
            ],
            dim=2,
        )

    def flow_mel(
        self, voice: VoiceCondition, tokens: list[int], start: int, split: bool, carried: "object" = None
    ) -> tuple["object", "object"]:
        """The flow's mel (1, 80, n) for `tokens`, whose first frame is frame `start` of the speech,
        and the condition (1, 80, n) it was drawn toward. `carried`, when given, replaces the
        condition of the first frames (the previous chunk's view of their shared look-ahead)."""
        import torch
        from torch.nn import functional as F

        flow, device, dtype = self.flow, self.device, self.dtype
        prompt_tokens, prompt_mel = voice.tokens.to(device), voice.mel.to(device, dtype)
        token = torch.concat([prompt_tokens, torch.tensor([tokens], dtype=torch.int32, device=device)], dim=1)
        n_prompt, prompt_frames, frames = prompt_tokens.shape[1], prompt_mel.shape[1], self.mel_frames(len(tokens))
        with torch.inference_mode():
            embedding = flow.spk_embed_affine_layer(F.normalize(voice.embedding.to(device, dtype), dim=1))
            lengths = torch.tensor([token.shape[1]], dtype=torch.int32, device=device)
            h, _ = flow.encoder(flow.input_embedding(torch.clamp(token, min=0)), lengths)
            h = flow.encoder_proj(h)
            parts = [self.stretch(h[:, n_prompt:], frames, split)]
            if n_prompt:
                parts.insert(0, self.stretch(h[:, :n_prompt], prompt_frames, split=False))
            mu = flow.length_regulator.model(torch.concat(parts, dim=2))
            if carried is not None:
                mu[:, :, prompt_frames : prompt_frames + carried.shape[2]] = carried.to(device, dtype)
            cond = torch.zeros(1, flow.output_size, prompt_frames + frames, device=device, dtype=dtype)
            cond[:, :, :prompt_frames] = prompt_mel.transpose(1, 2)
            z = torch.concat([self.noise_at(0, prompt_frames), self.noise_at(prompt_frames + start, frames)], dim=2)
            t_span = torch.linspace(0, 1, 11, device=device, dtype=dtype)
            if flow.decoder.t_scheduler == "cosine":
                t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
            mask = torch.ones(1, 1, prompt_frames + frames, device=device, dtype=dtype)
            mel = flow.decoder.solve_euler(z.to(device, dtype), t_span=t_span, mu=mu, mask=mask, spks=embedding, cond=cond)
        return mel[:, :, prompt_frames:].float().cpu(), mu[:, :, prompt_frames:].cpu()

    def stream(self, voice: VoiceCondition) -> DecodeStream:
        return DecodeStream(self, voice)

    def decode_offline(self, voice: VoiceCondition, tokens: list[int]) -> np.ndarray:
        """All tokens in one flow and one vocoder call (the reference's non-streaming path)."""
        mel, _ = self.flow_mel(voice, tokens, 0, split=False)
        return self.stream(voice).vocode(mel, final=True)


class DecodeStream:
    """One utterance's decoding state: tokens not yet spoken, the overlap's condition, the mel
    overlap and the vocoder's caches. push() takes the tokens generated so far and returns the audio
    now final."""

    def __init__(self, decoder: CosyVoiceDecoder, voice: VoiceCondition) -> None:
        import torch

        self._decoder = decoder
        self._voice = voice
        self._tokens: list[int] = []
        self._offset = 0  # tokens already turned into audio
        self._frame = 0  # mel frames already handed to the vocoder
        self._chunks = 0
        self._carried: "object" = None
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
        """Mel frames (1, 80, n) of one token chunk: the head's condition is the one the previous
        chunk gave the shared look-ahead, the head is cross-faded with that chunk's look-ahead mel,
        and (unless final) this chunk's look-ahead is held back for the next one."""
        from cosyvoice.utils.common import fade_in_out

        mel, mu = self._decoder.flow_mel(self._voice, tokens, self._frame, split=True, carried=self._carried)
        if self._mel_overlap.shape[2]:
            mel = fade_in_out(mel, self._mel_overlap, self._mel_window)
        if not final:
            # The look-ahead's mel is decoded again, better informed, by the next chunk.
            held = self._mel_overlap_frames
            self._mel_overlap, self._carried = mel[:, :, -held:], mu[:, :, -held:]
            mel = mel[:, :, :-held]
        self._frame += mel.shape[2]
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
