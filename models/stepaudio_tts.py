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

from models.base import ModelSetupError, SpeechChunk
from models.cosyvoice_decoder import SAMPLE_RATE, CosyVoiceDecoder, VoiceCondition, resolve_dtype
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
TOP_K = 50  # the reference leaves the transformers default in effect
GUARD_WINDOW = 10
MUSIC_TAGS = ("RAP", "哼唱")
DECODER_DIR, MUSIC_DECODER_DIR = "CosyVoice-300M-25Hz", "CosyVoice-300M-25Hz-Music"
SPEAKERS_FILE = "speakers_info.json"
# One leading instruction group, as the reference detects it: at the very start of the text.
_FIRST_TAG = re.compile(r"[(\uff08]([^()\uff08\uff09]*)[)\uff09]")
_TAG_RUN = re.compile(r"(?:\s*[(\uff08][^()\uff08\uff09]*[)\uff09])+")


@dataclass(frozen=True)
class SystemPrompts:
    """TTS-3B's four system prompts, chosen per sentence as the reference chooses them. The defaults
    are our own wording (the upstream prompts are prose in StepFun's code, not a published format);
    `--stepaudio-tts-prompts` supplies the originals."""

    without_speaker: str = "作为一名卓越的声优演员，请按照文本中括号内标注的情感、语种或方言、音乐哼唱和语速标签，自然流畅地朗读文本。"
    with_speaker: str = without_speaker + "\n请用对话历史里{speaker}的音色朗读。"
    rap: str = "请用对话历史里的音色，以说唱的方式把文本大声唱出来。"
    humming: str = "请用对话历史里的音色，以哼唱的方式把文本大声唱出来。"

    def choose(self, text: str, speaker: str | None) -> str:
        """Music mode takes its own prompt (humming when the text mentions 哼唱 anywhere, as the
        reference tests it); else a registry speaker is named; a cloned voice (None) is not."""
        if music_mode(text):
            return self.humming if "哼唱" in text else self.rap
        return self.with_speaker.replace("{speaker}", speaker) if speaker else self.without_speaker


def instruction(text: str) -> str:
    """The instruction the reference reads: the whole of a parenthesised group (ASCII or full
    width) that opens the text, e.g. `高兴1`, `RAP`, or `RAP 快速1`; empty when the text does not
    start with one."""
    match = _FIRST_TAG.match(text)
    return match.group(1) if match else ""


def music_mode(text: str) -> str | None:
    """RAP or humming when the text opens with exactly that group: it switches the decoder to the
    music one (and, for a registry speaker, the voice to its `{speaker}RAP` / `{speaker}哼唱` entry)."""
    name = instruction(text)
    return name if name in MUSIC_TAGS else None


def tag_prefix(text: str) -> str:
    """The run of instruction groups a text starts with, verbatim (`(高兴1)（四川话）`), so that the
    later sentences of a reply can carry the tags its first sentence set."""
    match = _TAG_RUN.match(text)
    return match.group(0).strip() if match else ""


def tagged(text: str, tags: str) -> str:
    """A sentence as TTS-3B reads it: with the reply's current tags in front unless it has its own."""
    return text if tag_prefix(text) or not tags else tags + text


def tts_prompt_ids(
    encode: Callable[[str], list[int]], system: str, prompt_text: str, prompt_audio_ids: list[int], target_text: str
) -> list[int]:
    """The TTS-3B prompt: system turn, the voice prompt as a fake earlier turn (its transcript, then
    its audio), the target text, and the opening of the assistant turn that will hold the audio.
    `encode` adds the tokenizer's BOS, as the reference's does: each turn opens `[BOT, BOS, ...]`.
    A transcript is encoded after a newline and the newline's tokens cut off, so that its first
    word is tokenized as it is after the role line."""
    newline = len(encode("\n"))

    def body(text: str) -> list[int]:
        return encode("\n" + text)[newline:]

    human, assistant = encode("human\n"), encode("assistant\n")
    return (
        [BOS]
        + [BOT, *encode("system\n" + system), EOT]
        + [BOT, *human, *body(prompt_text), EOT]
        + [BOT, *assistant, *prompt_audio_ids, EOT]
        + [BOT, *human, *body(target_text), EOT]
        + [BOT, *assistant]
    )


def guard_repetition(ids: list[int], scores: Any) -> None:
    """The reference's repetition guard: when the last token occurs more than once in the last 10
    of the sequence (the prompt's tail included), it is banned for the next step."""
    window = ids[-GUARD_WINDOW:]
    if len(window) == GUARD_WINDOW and window.count(window[-1]) > 1:
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
        system_prompts: SystemPrompts = SystemPrompts(),
        speakers: Path | None = None,
        dtype: str = "auto",
    ) -> None:
        """`clone`, when given, is the voice for all speech, music included (with the music
        decoder); `speakers` is the registry folder (default `directory/speakers`); `dtype` is the
        LM's and the flow's (auto: bfloat16 on a GPU, as the reference runs them, else float32)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.directory = directory
        self.speakers_dir = speakers or directory / "speakers"
        self.lm_worker, self.decoder_worker = lm_worker, decoder_worker
        self.speaker = speaker
        self.clone = clone
        self.system_prompts = system_prompts
        self.max_seconds_per_char = max_seconds_per_char
        self._audio_token_ids = audio_token_ids
        # A cloned voice speaks everything: the registry is then optional.
        has_registry = (self.speakers_dir / SPEAKERS_FILE).is_file()
        self.speakers = read_speakers(self.speakers_dir) if clone is None or has_registry else {}
        self._text_tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
        torch_dtype = resolve_dtype(dtype, device)
        self._model = AutoModelForCausalLM.from_pretrained(
            directory, trust_remote_code=True, dtype=torch_dtype, device_map=device
        ).eval()
        self.decoders = {
            None: CosyVoiceDecoder(directory / DECODER_DIR, device, threads, torch_dtype),
            "music": CosyVoiceDecoder(directory / MUSIC_DECODER_DIR, device, threads, torch_dtype),
        }
        self._voices: dict[tuple[str, str, str], Voice] = {}
        self._voices_lock = threading.Lock()

    async def aclose(self) -> None:
        """Drop the voices computed so far; the weights go with the last reference to this TTS."""
        with self._voices_lock:
            self._voices.clear()

    # -- voices -------------------------------------------------------------------------------
    def registry_voice(self, speaker: str, mode: str | None = None) -> dict[str, str]:
        """The clone dictionary of a registry speaker (`{speaker}RAP` / `{speaker}哼唱` in music
        mode), with the prompt wav found in the speakers folder."""
        entry = f"{speaker}{mode}" if mode else speaker
        if entry not in self.speakers:
            raise KeyError(f"speaker {entry!r} is not in {self.speakers_dir / SPEAKERS_FILE}")
        wav = self.speakers_dir / f"{entry}_prompt.wav"
        return {"speaker": entry, "prompt_text": self.speakers[entry], "wav_path": str(wav)}

    def voice(self, clone: dict[str, str]) -> Voice:
        """The voice of a clone dictionary `{"speaker", "prompt_text", "wav_path"}`; computed once.
        As in the reference: the LM's audio tokens come from the prompt trimmed of silence, the
        flow's prompt mel and x-vector from the whole prompt, both by the normal decoder's frontend
        (the music decoder is conditioned the same way)."""
        key = (clone["speaker"], clone["prompt_text"], str(clone["wav_path"]))
        with self._voices_lock:
            if key in self._voices:
                return self._voices[key]
        import soundfile

        audio, rate = soundfile.read(clone["wav_path"], dtype="float32", always_2d=True)
        ids = self._audio_token_ids(audio.mean(axis=1), rate)
        condition = self.decoders[None].condition(audio.mean(axis=1), rate, [i - AUDIO_ID_BASE for i in ids])
        voice = Voice(clone["speaker"], clone["prompt_text"], Path(clone["wav_path"]), tuple(ids), condition)
        with self._voices_lock:
            self._voices[key] = voice
        log.info("stepaudio.voice_prepared", speaker=voice.speaker, prompt_tokens=len(ids))
        return voice

    def sentence_voice(self, text: str) -> tuple[dict[str, str], str | None]:
        """Which voice speaks a sentence and under which speaker name its system prompt is chosen
        (None: a clone, not named)."""
        mode = music_mode(text)
        if self.clone is not None:
            return self.clone, None
        return self.registry_voice(self.speaker, mode), self.speaker

    # -- prompts ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token IDs as the reference's tokenizer call gives them: with the BOS in front."""
        return self._text_tokenizer.encode(text, add_special_tokens=True)

    def prompt_ids(self, voice: Voice, target_text: str, speaker: str | None) -> list[int]:
        system = self.system_prompts.choose(target_text, speaker)
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

        class AudioOnly(LogitsProcessor):
            """The repetition guard; and only audio IDs or the end of the turn (the reference does
            not restrict: a text token here would have no sound, so it is never sampled)."""

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                guard_repetition(input_ids[0].tolist(), scores)
                return scores + allowed.to(scores.device, scores.dtype)

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
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
                top_k=TOP_K,
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
    async def speak(self, text: str, tags: str = "") -> AsyncIterator[SpeechChunk]:
        """One piece of text as speech chunks, each as soon as its tokens are decoded. `tags` is the
        reply's current run of instruction groups, put in front of a piece that has none."""
        target = tagged(text, tags)
        clone, speaker = self.sentence_voice(target)
        voice = await self.decoder_worker.run(self.voice, clone)
        decoder = self.decoders["music" if music_mode(target) else None]
        prompt = self.prompt_ids(voice, target, speaker)
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
        tags = ""

        async def pieces() -> AsyncIterator[str]:
            async for delta in text:
                for piece in chunker.push(delta):
                    yield piece
            for piece in chunker.flush():
                yield piece

        async for piece in pieces():
            tags = tag_prefix(piece) or tags
            async for chunk in self.speak(piece, tags):
                yield chunk


def read_speakers(folder: Path) -> dict[str, str]:
    """speaker id -> prompt transcript, from `speakers_info.json` (released copies of it are not all
    UTF-8), each with its `{id}_prompt.wav` beside it."""
    path = folder / SPEAKERS_FILE
    if not path.is_file():
        raise ModelSetupError(
            f"no speaker registry at {path}: the published Step-Audio-TTS-3B folder has none; the "
            "registry (speakers_info.json and the *_prompt.wav files) is the speakers/ folder of "
            "StepFun's Step-Audio code repository. Pass it with --stepaudio-speakers DIR, or "
            "speak with a cloned voice (--stepaudio-clone)."
        )
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
