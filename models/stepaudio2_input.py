"""Step-Audio 2's input as its reference builds it (`stepaudio2.py` and `utils.py` of
stepfun-ai/Step-Audio2): turns in the `<|BOT|>role\\n...<|EOT|>` layout (the user is `human`), each
piece of text tokenized on its own and the pieces' ids joined; 16 kHz audio cut into windows of at
most 25 s, each a 128-bin log-mel whose features the model puts in place of the
`<audio_start>` + `<audio_patch>` x N + `<audio_end>` that stand for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 25 * SAMPLE_RATE
N_MELS = 128
N_FFT = 400
HOP = 160
MEL_PADDING = 479  # zeros after the audio before the STFT
AUDIO_START_ID = 151688  # the model writes a window's features right after this id
TEXT_ID_LIMIT = 151688  # ids below are text
AUDIO_TOKEN_BASE = 151696  # audio token n (CosyVoice2's) is id AUDIO_TOKEN_BASE + n


@dataclass(frozen=True)
class Audio:
    """16 kHz mono float audio in a turn."""

    samples: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Tokens:
    """Ids put into a turn as they are (an earlier reply's text and audio tokens)."""

    ids: tuple[int, ...]


Content = str | Audio | Tokens


@dataclass(frozen=True)
class Turn:
    """One message: `content` a string, parts, or None (a turn the model is to write); `eot`
    False leaves the turn open (an assistant turn opened with `<tts_start>`)."""

    role: str
    content: str | tuple[Content, ...] | None
    eot: bool = True


def log_mel(samples: np.ndarray, padding: int = MEL_PADDING) -> Any:
    """The reference's (128, frames) log-mel of 16 kHz audio (Whisper's, after `padding` zeros):
    a centred 400-point STFT every 160 samples with a Hann window, the last frame dropped,
    librosa's mel filters on the power spectrum, log10 floored at 1e-10 and at 8 below the peak,
    (x + 4) / 4."""
    import librosa
    import torch

    audio = torch.nn.functional.pad(torch.as_tensor(np.asarray(samples, dtype=np.float32)), (0, padding))
    stft = torch.stft(audio, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS))
    spec = torch.clamp(filters @ power, min=1e-10).log10()
    spec = torch.maximum(spec, spec.max() - 8.0)
    return (spec + 4.0) / 4.0


def patch_count(frames: int) -> int:
    """`<audio_patch>` tokens for a window of `frames` mel frames: what is left after the encoder's
    stride-2 convolution and 2x pooling (the padding's 2 frames not counted) and the adapter's
    stride-2 convolution (kernel 3, padding 1)."""
    encoded = (frames - 2 + 1) // 2 // 2
    return (encoded + 2 * 1 - 3) // 2 + 1


def audio_windows(samples: np.ndarray) -> list[np.ndarray]:
    return [samples[i : i + WINDOW_SAMPLES] for i in range(0, len(samples), WINDOW_SAMPLES)]


def chat_pieces(turns: Sequence[Turn]) -> tuple[list[str | list[int]], list[Any]]:
    """The prompt's pieces (text to tokenize, or ids) and the mel of each audio window, in order."""
    pieces: list[str | list[int]] = []
    mels: list[Any] = []
    for turn in turns:
        role = "human" if turn.role == "user" else turn.role
        if isinstance(turn.content, str):
            pieces.append(f"<|BOT|>{role}\n{turn.content}" + ("<|EOT|>" if turn.eot else ""))
            continue
        pieces.append(f"<|BOT|>{role}\n")
        if turn.content is None:
            continue
        for part in turn.content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Tokens):
                pieces.append(list(part.ids))
            else:
                for window in audio_windows(part.samples):
                    mels.append(log_mel(window))
                    pieces.append("<audio_start>" + "<audio_patch>" * patch_count(mels[-1].shape[1]) + "<audio_end>")
        if turn.eot:
            pieces.append("<|EOT|>")
    return pieces, mels


def piece_ids(tokenizer: Any, pieces: Sequence[str | list[int]]) -> list[int]:
    """The prompt's ids: each text piece tokenized on its own, as the reference does."""
    ids: list[int] = []
    for piece in pieces:
        ids += piece if isinstance(piece, list) else tokenizer(text=piece)["input_ids"]
    return ids


def split_reply(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """A reply's text ids and its audio tokens (CosyVoice2's numbering); control ids between
    (`<tts_start>`, `<audio_start>`...) belong to neither."""
    return [i for i in ids if i < TEXT_ID_LIMIT], [i - AUDIO_TOKEN_BASE for i in ids if i >= AUDIO_TOKEN_BASE]
