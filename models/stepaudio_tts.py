"""Step-Audio TTS-3B: text -> audio tokens (a Step1 LM prompted with a voice), streamed into the
CosyVoice decoder, so speech starts after the first token chunk rather than the whole sentence.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Callable

import structlog

import numpy as np

from models.base import SpeechChunk
from models.cosyvoice_decoder import SAMPLE_RATE, CosyVoiceDecoder, VoiceCondition
from models.generation import stopping_on
from models.sentences import SpeechChunker
from runtime.audio_tokens import AUDIO_ID_BASE, AUDIO_IDS, TOKENS_PER_SECOND
from runtime.bridge import Post, thread_stream
from runtime.workers import ModelWorker

log = structlog.get_logger(__name__)

BOS, EOT, BOT = 1, 3, 4
# A voice prompt's audio (mono float PCM and its rate) to its audio token IDs.
AudioTokenIds = Callable[[np.ndarray, int], list[int]]
TEMPERATURE = 0.7
GUARD_WINDOW = 10
MUSIC_TAGS = ("RAP", "哼唱")
DECODER_DIR, MUSIC_DECODER_DIR = "CosyVoice-300M-25Hz", "CosyVoice-300M-25Hz-Music"
# Our own wording: the upstream system prompts are not part of the published formats.
SYSTEM_PROMPT = "作为一名卓越的声优演员，请按照文本中括号内标注的情感、语种或方言、音乐哼唱和语速标签，自然流畅地朗读文本。"
SYSTEM_PROMPT_WITH_SPEAKER = SYSTEM_PROMPT + "\n请用对话历史里{speaker}的音色朗读。"
_TAG = re.compile(r"\s*[(\uff08]([^()\uff08\uff09]*)[)\uff09]")


def leading_tags(text: str) -> list[str]:
    """The instruction tags a text starts with: `(高兴1)(四川话)...` or `（RAP 快速1）...`, stacked."""
    tags: list[str] = []
    position = 0
    while match := _TAG.match(text, position):
        tags += [t for t in re.split(r"[\s,，、]+", match.group(1)) if t]
        position = match.end()
    return tags


def music_mode(tags: list[str]) -> str | None:
    """RAP or humming when the first tag asks for it (it switches voice entry and decoder)."""
    return tags[0] if tags and tags[0] in MUSIC_TAGS else None


def tts_prompt_ids(
    encode: Callable[[str], list[int]], system: str, prompt_text: str, prompt_audio_ids: list[int], target_text: str
) -> list[int]:
    """The TTS-3B prompt: system turn, the voice prompt as a fake earlier turn (its transcript, then
    its audio), the target text, and the opening of the assistant turn that will hold the audio."""
    return (
        [BOS]
        + [BOT, *encode("system\n" + system), EOT]
        + [BOT, *encode("human\n" + prompt_text), EOT]
        + [BOT, *encode("assistant\n"), *prompt_audio_ids, EOT]
        + [BOT, *encode("human\n" + target_text), EOT]
        + [BOT, *encode("assistant\n")]
    )


def guard_repetition(recent: list[int], scores: Any) -> None:
    """Step-Audio's repetition guard: a token seen more than once in the last 10 is banned next step."""
    window = recent[-GUARD_WINDOW:]
    if window and window.count(window[-1]) > 1:
        scores[..., window[-1]] = float("-inf")


@dataclass(frozen=True)
class Voice:
    """A voice prompt: the registry entry or clone dictionary it came from, as the TTS LM and the
    decoder need it (computed once per voice and cached)."""

    speaker: str
    prompt_text: str
    wav_path: Path
    audio_ids: tuple[int, ...]
    condition: VoiceCondition


class StepAudioTTS:
    """Owns TTS-3B (the LM, its tokenizer, the speaker registry) and its two CosyVoice decoders.

    Token generation runs in `lm_worker`, decoding in `decoder_worker`, so that a sentence's audio
    is decoded while its later tokens are still being generated."""

    def __init__(
        self,
        directory: Path,
        audio_token_ids: AudioTokenIds,
        lm_worker: ModelWorker,
        decoder_worker: ModelWorker,
        device: str = "cpu",
        speaker: str = "Tingting",
        max_seconds_per_char: float = 0.6,
        threads: int = 2,
        clone: dict[str, str] | None = None,
        system_prompts: tuple[str, str] = (SYSTEM_PROMPT, SYSTEM_PROMPT_WITH_SPEAKER),
    ) -> None:
        """`clone`, when given, is the voice for plain speech (RAP and humming keep the registry
        speaker's entries); `system_prompts` are the prompts without and with a `{speaker}`."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.directory = directory
        self.lm_worker, self.decoder_worker = lm_worker, decoder_worker
        self.speaker = speaker
        self.clone = clone
        self.system_prompts = system_prompts
        self.max_seconds_per_char = max_seconds_per_char
        self._audio_token_ids = audio_token_ids
        self._text_tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(
            directory, trust_remote_code=True, dtype=dtype, device_map=device
        ).eval()
        self.decoders = {
            None: CosyVoiceDecoder(directory / DECODER_DIR, device, threads),
            "music": CosyVoiceDecoder(directory / MUSIC_DECODER_DIR, device, threads),
        }
        self.speakers = read_speakers(directory / "speakers" / "speakers_info.json")
        self._voices: dict[tuple[str, str, str, bool], Voice] = {}
        self._voices_lock = threading.Lock()

    # -- voices -------------------------------------------------------------------------------
    def registry_voice(self, speaker: str, mode: str | None = None) -> dict[str, str]:
        """The clone dictionary of a registry speaker (`{speaker}RAP` / `{speaker}哼唱` in music
        mode), with the prompt wav found relative to the model directory."""
        entry = f"{speaker}{mode}" if mode else speaker
        if entry not in self.speakers:
            raise KeyError(f"speaker {entry!r} is not in {self.directory / 'speakers' / 'speakers_info.json'}")
        wav = self.directory / "speakers" / f"{entry}_prompt.wav"
        return {"speaker": entry, "prompt_text": self.speakers[entry], "wav_path": str(wav)}

    def voice(self, clone: dict[str, str], music: bool = False) -> Voice:
        """The voice of a clone dictionary `{"speaker", "prompt_text", "wav_path"}`; computed once."""
        key = (clone["speaker"], clone["prompt_text"], str(clone["wav_path"]), music)
        with self._voices_lock:
            if key in self._voices:
                return self._voices[key]
        import soundfile

        audio, rate = soundfile.read(clone["wav_path"], dtype="float32", always_2d=True)
        ids = self._audio_token_ids(audio.mean(axis=1), rate)
        decoder = self.decoders["music" if music else None]
        condition = decoder.condition(audio.mean(axis=1), rate, [i - AUDIO_ID_BASE for i in ids])
        voice = Voice(clone["speaker"], clone["prompt_text"], Path(clone["wav_path"]), tuple(ids), condition)
        with self._voices_lock:
            self._voices[key] = voice
        log.info("stepaudio.voice_prepared", speaker=voice.speaker, prompt_tokens=len(ids))
        return voice

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._text_tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, voice: Voice, target_text: str, with_speaker: bool = True) -> list[int]:
        without, with_ = self.system_prompts
        system = with_.replace("{speaker}", voice.speaker) if with_speaker else without
        return tts_prompt_ids(self.encode, system, voice.prompt_text, list(voice.audio_ids), target_text)

    # -- generation ---------------------------------------------------------------------------
    def generate_now(self, prompt: list[int], max_tokens: int, post: Post[int], stop: threading.Event) -> None:
        """Blocking: sample audio IDs until EOT, posting each; ends at the first step after `stop`."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList
        from transformers.generation.streamers import BaseStreamer

        allowed = torch.full((self._model.config.vocab_size,), float("-inf"))
        allowed[AUDIO_IDS.start : AUDIO_IDS.stop] = 0.0
        allowed[EOT] = 0.0
        generated: list[int] = []

        class AudioOnly(LogitsProcessor):
            """Only audio IDs or the end of the turn; and the repetition guard."""

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                scores = scores + allowed.to(scores.device, scores.dtype)
                guard_repetition(generated, scores)
                return scores

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    generated.append(token)
                    if token != EOT:
                        post(token)

            def end(self) -> None:
                pass

        ids = torch.tensor([prompt], device=self._model.device)
        with torch.inference_mode():
            self._model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                max_new_tokens=max_tokens,
                eos_token_id=EOT,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([AudioOnly()]),
                streamer=Streamer(),
                stopping_criteria=stopping_on(stop),
            )

    def tokens(self, prompt: list[int], max_tokens: int) -> AsyncGenerator[int, None]:
        """The audio IDs of one generation, as they come; closing the iterator stops the LM."""
        return thread_stream(self.lm_worker, functools.partial(self.generate_now, prompt, max_tokens))

    # -- speech -------------------------------------------------------------------------------
    async def speak(self, text: str, tags: list[str]) -> AsyncIterator[SpeechChunk]:
        """One piece of text as speech chunks, each as soon as its tokens are decoded. `tags` are the
        reply's current instruction tags (they persist until a piece sets new ones)."""
        mode = music_mode(tags)
        clone = self.clone if self.clone is not None and mode is None else self.registry_voice(self.speaker, mode)
        voice = await self.decoder_worker.run(self.voice, clone, mode is not None)
        decoder = self.decoders["music" if mode else None]
        target = text if leading_tags(text) or not tags else "".join(f"({t})" for t in tags) + text
        prompt = self.prompt_ids(voice, target)
        max_tokens = int(TOKENS_PER_SECOND * (2.0 + self.max_seconds_per_char * len(text)))
        stream = decoder.stream(voice.condition)
        teller = _TextTeller(text)
        batch: list[int] = []
        generation = self.tokens(prompt, max_tokens)
        try:
            async for token in generation:
                batch.append(token - AUDIO_ID_BASE)
                if stream.ready(len(batch)):
                    for pcm in await self.decoder_worker.run(stream.push, batch):
                        yield SpeechChunk(pcm, SAMPLE_RATE, teller.take(len(pcm), done=False))
                    batch = []
        finally:
            await generation.aclose()
        pcm = await self.decoder_worker.run(stream.finish, batch)
        if len(pcm):
            yield SpeechChunk(pcm, SAMPLE_RATE, teller.take(len(pcm), done=True))

    async def synthesize(self, text: AsyncIterator[str]) -> AsyncIterator[SpeechChunk]:
        chunker = SpeechChunker()
        tags: list[str] = []

        async def pieces() -> AsyncIterator[str]:
            async for delta in text:
                for piece in chunker.push(delta):
                    yield piece
            for piece in chunker.flush():
                yield piece

        async for piece in pieces():
            tags = leading_tags(piece) or tags
            async for chunk in self.speak(piece, tags):
                yield chunk


def read_speakers(path: Path) -> dict[str, str]:
    """speaker id -> prompt transcript. Released copies of this file are not all UTF-8."""
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "gbk"):
        try:
            return json.loads(raw.decode(encoding))
        except UnicodeDecodeError:
            continue
    raise ValueError(f"{path}: neither UTF-8 nor GBK")


class _TextTeller:
    """Hands out a piece's text to its audio chunks in proportion to the audio so far, against an
    estimate of the whole (the history keeps only what was heard)."""

    CHARS_PER_SECOND_LATIN, CHARS_PER_SECOND_CJK = 14.0, 4.5

    def __init__(self, text: str) -> None:
        self.text = text
        cjk = sum(1 for ch in text if "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef")
        seconds = cjk / self.CHARS_PER_SECOND_CJK + (len(text) - cjk) / self.CHARS_PER_SECOND_LATIN
        self.expected = max(1, int(seconds * SAMPLE_RATE))
        self.samples = 0
        self.given = 0

    def take(self, samples: int, done: bool) -> str:
        self.samples += samples
        upto = len(self.text) if done else min(len(self.text), int(len(self.text) * self.samples / self.expected))
        if not done and upto < len(self.text):
            upto = self.text.rfind(" ", self.given, upto) + 1 or upto  # whole words where there are words
        piece, self.given = self.text[self.given : upto], max(self.given, upto)
        return piece
