"""Step-Audio 2 mini's model, in-process: a Whisper-style audio encoder and an adapter in front of a
Qwen2 decoder, loaded from the published directory (`config.json` with `text_config` and
`audio_encoder_config`, safetensors weights named `encoder.*`, `adapter.*`, `model.*`,
`lm_head.*`). Written from the architecture (StepFun's `modeling_step_audio_2.py` is the
reference it is checked against); the decoder is transformers' own Qwen2."""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.stepaudio2_input import AUDIO_START_ID
from models.transformers_lm import PrefixCache

ADAPTER_HIDDEN = 2048  # the adapter's inner width, fixed in the architecture
HEARD_WINDOWS = 8  # whole windows encoded while their speaker went on, kept for the prompts that hold them
# The nucleus is looked for among the likeliest ids first: sorting all 158,720 takes ~10 ms a step
# on a CPU core, and a trained model's nucleus is a handful of ids.
NUCLEUS_FIRST_LOOK = 512


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedily at temperature 0, else as transformers' sampling
    does with a repetition penalty over every id so far (prompt included), temperature, top-p.
    The reference's examples use 0.7, 0.9, 1.05."""

    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.05

    def pick(self, logits: torch.Tensor, seen: torch.Tensor, generator: torch.Generator | None = None) -> int:
        logits = logits.float().clone()
        if self.repetition_penalty != 1.0:
            past = logits[seen]
            logits[seen] = torch.where(past > 0, past / self.repetition_penalty, past * self.repetition_penalty)
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = F.softmax(logits / self.temperature, dim=-1)
        ordered, order = probs.topk(min(NUCLEUS_FIRST_LOOK, len(probs)))
        if float(ordered.sum()) <= self.top_p:  # the nucleus reaches past them: sort everything
            ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered > self.top_p  # the nucleus always keeps the likeliest
        ordered[outside] = 0.0
        return int(order[torch.multinomial(ordered, 1, generator=generator)])


@dataclass(frozen=True)
class EncoderShape:
    """`audio_encoder_config` of the model's config.json."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    llm_dim: int
    kernel_size: int
    adapter_stride: int

    @classmethod
    def from_config(cls, fields: dict[str, Any]) -> EncoderShape:
        return cls(**{name: int(fields[name]) for name in cls.__dataclass_fields__})


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, frames, width = x.shape
        scale = (width // self.heads) ** -0.25  # on queries and keys both, as Whisper does

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, frames, self.heads, -1).transpose(1, 2)

        scores = (heads(self.query(x)) * scale) @ (heads(self.key(x)) * scale).transpose(-1, -2) + bias
        weights = F.softmax(scores.float(), dim=-1).to(x.dtype)
        return self.out((weights @ heads(self.value(x))).transpose(1, 2).reshape(batch, frames, width))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = _Attention(width, heads)
        self.attn_ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_ln = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), bias)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """Log-mel (batch, mels, frames) -> (batch, frames / 4, state): two convolutions (the second
    of stride 2), learnt positions, pre-norm attention blocks over the window (padding masked),
    2x average pooling."""

    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        width = shape.n_audio_state
        self.conv1 = nn.Conv1d(shape.n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(shape.n_audio_ctx, width)
        self.blocks = nn.ModuleList([_Block(width, shape.n_audio_head) for _ in range(shape.n_audio_layer)])
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(width)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = mels.shape[-1]
        x = F.gelu(self.conv2(F.gelu(self.conv1(mels)))).transpose(1, 2)
        # A frame after the convolution is real when the mel frame it is centred on is.
        real = torch.arange(frames, device=mels.device)[None] < lengths[:, None]
        real = real[:, (frames + 1) % 2 :: 2]
        bias = ((~real).to(x.dtype) * -1.0e10)[:, None, None, :]
        x = x + self.positional_embedding.weight[: x.shape[1]]
        for block in self.blocks:
            x = block(x, bias)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        return self.after_norm(x), (lengths + 1) // 2 // 2


class Adapter(nn.Module):
    """Encoder frames -> the decoder's width, at half their rate (a stride-2 convolution)."""

    def __init__(self, shape: EncoderShape) -> None:
        super().__init__()
        width = shape.n_audio_state
        self.conv = nn.Conv1d(width, width, shape.kernel_size, shape.adapter_stride, padding=1)
        self.linear1 = nn.Linear(width, ADAPTER_HIDDEN)
        self.linear2 = nn.Linear(ADAPTER_HIDDEN, shape.llm_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(F.relu(self.linear1(x))), (lengths - 1) // 2 + 1


class StepAudio2Model(nn.Module):
    """Owns the whole model: encoder, adapter, decoder and output layer, on one device and dtype."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        from transformers import Qwen2Config, Qwen2Model

        text = dict(config["text_config"])
        text.pop("architectures", None)
        self.text_config = Qwen2Config(**text)
        shape = EncoderShape.from_config(config["audio_encoder_config"])
        self.model = Qwen2Model(self.text_config)
        self.encoder = AudioEncoder(shape)
        self.adapter = Adapter(shape)
        self.lm_head = nn.Linear(self.text_config.hidden_size, self.text_config.vocab_size, bias=False)
        self.prefix_cache = PrefixCache()
        self.reused_tokens = 0  # prompt positions served from the prefix cache, over all generations
        self._heard: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._heard_lock = threading.Lock()
        self.windows_encoded = 0  # audio windows run through the encoder, over all calls

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> StepAudio2Model:
        from safetensors.torch import load_file

        model = cls(json.loads((directory / "config.json").read_text()))
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(directory.glob("*.safetensors")):
            state.update(load_file(shard))
        model.load_state_dict(state, strict=True)
        return model.to(device, dtype).eval()

    def audio_features(self, mels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each window's features for the decoder (patches, width), batched through the encoder
        padded to the longest, as the reference pads them (its 2 padding frames not counted); a
        window encoded ahead (`encode_ahead`) is taken as it is."""
        with self._heard_lock:
            known = {i: self._heard[k] for i, k in enumerate(map(mel_fingerprint, mels)) if k in self._heard}
        wanted = [i for i in range(len(mels)) if i not in known]
        if wanted:
            encoded = self._encode([mels[i] for i in wanted], max(m.shape[1] for m in mels))
            known.update(zip(wanted, encoded, strict=True))
        return [known[i] for i in range(len(mels))]

    @torch.inference_mode()
    def encode_ahead(self, mel: torch.Tensor) -> None:
        """Run a whole 25 s window through the encoder and adapter while its speaker goes on, so
        that the prompt that holds it at the pause does not: a window as long as any, so no batch
        would pad it."""
        (features,) = self._encode([mel], mel.shape[1])
        with self._heard_lock:
            self._heard[mel_fingerprint(mel)] = features
            while len(self._heard) > HEARD_WINDOWS:
                self._heard.popitem(last=False)

    def _encode(self, mels: Sequence[torch.Tensor], width: int) -> list[torch.Tensor]:
        """Windows through the encoder and adapter in one batch padded to `width` frames."""
        self.windows_encoded += len(mels)
        lengths = torch.tensor([m.shape[1] - 2 for m in mels], dtype=torch.int32, device=self.lm_head.weight.device)
        batch = torch.zeros(len(mels), mels[0].shape[0], width, device=lengths.device)
        for i, mel in enumerate(mels):
            batch[i, :, : mel.shape[1]] = mel
        encoded, lengths = self.encoder(batch.to(self.lm_head.weight.dtype), lengths)
        adapted, lengths = self.adapter(encoded, lengths)
        return [adapted[i, : int(n)] for i, n in enumerate(lengths)]

    def embed(self, ids: Sequence[int], mels: Sequence[torch.Tensor], skip: int = 0) -> torch.Tensor:
        """(1, len - skip, width) input embeddings of `ids[skip:]`: the ids', with each audio
        window's features written after its `<audio_start>`, in order (a window wholly in the
        skipped part is not encoded)."""
        device = self.lm_head.weight.device
        ids_tensor = torch.tensor([list(ids)], device=device)
        embeds = self.model.embed_tokens(ids_tensor[:, skip:])
        starts = (ids_tensor[0] == AUDIO_START_ID).nonzero()[:, 0].tolist()
        assert len(starts) == len(mels), f"{len(starts)} <audio_start> for {len(mels)} audio windows"
        wanted = [i for i, start in enumerate(starts) if start + 1 + _patches(ids, start) > skip]
        if wanted:
            for i, features in zip(wanted, self.audio_features([mels[i] for i in wanted]), strict=True):
                at = starts[i] + 1 - skip
                head = max(0, -at)  # patches already in the cache
                embeds[0, at + head : at + features.shape[0]] = features[head:]
        return embeds

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], mels: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """(len, vocab) next-token logits at every position of a prompt."""
        hidden = self.model(inputs_embeds=self.embed(ids, mels)).last_hidden_state
        return self.lm_head(hidden)[0]

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], mels: Sequence[torch.Tensor] = ()) -> None:
        """Run a prompt's start through the model and keep its attention cache, so that a
        generation whose prompt begins with it prefills only the rest: the history and the speech
        so far, while the user still speaks."""
        key = cache_key(ids, mels)
        _, cache = self._run_prompt(ids, mels, key)
        self.prefix_cache.put(key, cache)

    def _run_prompt(self, ids: Sequence[int], mels: Sequence[torch.Tensor], key: list[int]) -> tuple[torch.Tensor, Any]:
        """The prompt's last hidden states and its attention cache, from the longest cached prefix."""
        from transformers import DynamicCache

        cache, reused = self.prefix_cache.take(key)
        self.reused_tokens += reused
        cache = cache if cache is not None else DynamicCache()
        hidden = self.model(inputs_embeds=self.embed(ids, mels, skip=reused), cache=cache, use_cache=True).last_hidden_state
        return hidden, cache

    @torch.inference_mode()
    def generate(
        self,
        ids: Sequence[int],
        mels: Sequence[torch.Tensor],
        sampling: Sampling,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """The reply's ids as they come, the stop id included. The attention cache of the longest
        prompt prefix an earlier generation shares (its audio windows the same) is reused, so a
        dialog's next turn prefills only what is new; closing the iterator ends the generation."""
        key = cache_key(ids, mels)
        hidden, cache = self._run_prompt(ids, mels, key)
        seen = torch.zeros(self.text_config.vocab_size, dtype=torch.bool, device=self.lm_head.weight.device)
        seen[torch.tensor(list(ids), device=seen.device)] = True
        reply: list[int] = []
        try:
            for _ in range(max_new_tokens):
                token = sampling.pick(self.lm_head(hidden[0, -1]), seen, generator)
                reply.append(token)
                yield token
                if token in stop_ids:
                    return
                seen[token] = True
                step = torch.tensor([[token]], device=seen.device)
                hidden = self.model(input_ids=step, cache=cache, use_cache=True).last_hidden_state
        finally:  # the prompt and the reply's ids that went through the model
            self.prefix_cache.put(key + reply, cache)


def _patches(ids: Sequence[int], start: int) -> int:
    """How many placeholders follow the `<audio_start>` at `start`."""
    end = start + 1
    while end < len(ids) and ids[end] == ids[start + 1]:
        end += 1
    return end - start - 1


def mel_fingerprint(mel: torch.Tensor) -> int:
    """A window's mel as a negative number (never an id): equal mels, equal numbers."""
    digest = hashlib.blake2b(mel.detach().cpu().numpy().tobytes(), digest_size=4).digest()
    return -1 - int.from_bytes(digest, "little")


def cache_key(ids: Sequence[int], mels: Sequence[torch.Tensor]) -> list[int]:
    """`ids` with each window's placeholders replaced by the fingerprint of its mel, so that two
    prompts share a cached prefix only where they share the audio too."""
    key = list(ids)
    starts = [i for i, token in enumerate(ids) if token == AUDIO_START_ID]
    for start, mel in zip(starts, mels, strict=True):
        n = _patches(ids, start)
        key[start + 1 : start + 1 + n] = [mel_fingerprint(mel)] * n
    return key


def load_tokenizer(directory: Path) -> Any:
    """The model directory's tokenizer (its `tokenizer.json`), with no remote code."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(directory, padding_side="right")
