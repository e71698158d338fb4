"""Step-Audio 2 mini as the agent's LM: the dialog laid out as the reference's examples lay it out
(the user's turns as their speech, earlier replies as `<tts_start>` and the ids the model wrote,
functions in a `tool_json_schemas` turn after the system prompt, a function's output in an `input`
turn), the reply opened with `<tts_start>` so that it speaks; generated in a worker thread and
streamed as its text, its ids for token2wav and its function calls."""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable, Sequence

import numpy as np

from models.base import Message, ModelIds, ToolCall
from models.stepaudio2_input import TEXT_ID_LIMIT, Audio, Content, Tokens, Turn, chat_pieces, log_mel, piece_ids
from runtime.bridge import thread_stream
from runtime.workers import ModelWorker

SPEAK = "<tts_start>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ASR_PROMPT = "请记录下你所听到的语音内容。"  # the reference's transcription instruction


def transcript_limit(audio: np.ndarray) -> int:
    """The most ids a transcription of `audio` (16 kHz) may take: room for ~8 a second."""
    return 16 + math.ceil(8 * len(audio) / 16000)


def tool_call_text(call: ToolCall) -> str:
    """A call as the model writes it: `<tool_call>function\\n{name}\\n{arguments}</tool_call>`."""
    return f"{TOOL_OPEN}function\n{call.name}\n{call.arguments}{TOOL_CLOSE}"


def chat_turns(messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, speak: bool = True) -> list[Turn]:
    """The model's turns for a prompt: the messages, then the reply to write."""
    turns: list[Turn] = []
    for index, m in enumerate(messages):
        if m.role == "system":
            turns.append(Turn("system", m.content))
            if tools and index == 0:
                turns.append(Turn("tool_json_schemas", json.dumps(tools, ensure_ascii=False)))
        elif m.role == "user":
            turns.append(Turn("user", (Audio(m.audio),) if m.audio is not None else m.content))
        elif m.role == "tool":
            turns.append(Turn("input", m.content))
        else:
            parts: list[Content] = [SPEAK, Tokens(m.ids)] if m.ids else [m.content] if m.content else []
            parts += [tool_call_text(call) for call in m.tool_calls]
            turns.append(Turn("assistant", tuple(parts)))
    turns.append(Turn("assistant", SPEAK, eot=False) if speak else Turn("assistant", None))
    return turns


class ReplyReader:
    """Owns the reading of one reply's ids as they come: the text deltas (whole characters only),
    the ids for the speech decoder, and the function calls, whose ids are neither."""

    def __init__(self, tokenizer: Any, call_ids: tuple[int, int] | None) -> None:
        self._tokenizer = tokenizer
        self._call_ids = call_ids
        self._text_ids: list[int] = []
        self._text = ""
        self._call: list[int] | None = None  # the ids of a call being written
        self._calls = 0

    def read(self, token: int) -> list[str | ToolCall | ModelIds]:
        if self._call_ids is not None and token == self._call_ids[0]:
            self._call = []
            return []
        if self._call is not None:
            if token != self._call_ids[1]:  # type: ignore[index]
                self._call.append(token)
                return []
            call, self._call = self._call, None
            return self._tool_call(call)
        out: list[str | ToolCall | ModelIds] = [ModelIds((token,))]
        if token < TEXT_ID_LIMIT:
            self._text_ids.append(token)
            text = self._tokenizer.decode(self._text_ids, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(self._text):  # a character's bytes are all in
                out.insert(0, text[len(self._text) :])
                self._text = text
        return out

    def _tool_call(self, ids: list[int]) -> list[str | ToolCall | ModelIds]:
        """`function\\n{name}\\n{arguments}`; anything else is not a call (dropped)."""
        kind, _, rest = self._tokenizer.decode(ids, skip_special_tokens=False).partition("\n")
        name, _, arguments = rest.partition("\n")
        if kind.strip() != "function" or not name.strip():
            return []
        self._calls += 1
        return [ToolCall(f"call_{self._calls}", name.strip(), arguments.strip() or "{}")]


@dataclass(frozen=True)
class Generate:
    """What one generation needs: the prompt's ids and audio windows' mels, and how to sample."""

    ids: list[int]
    mels: list[Any]
    max_new_tokens: int


class StepAudio2Chat:
    """Owns Step-Audio 2 as a LanguageModel: the prompt built from the messages, the generation in
    `worker` (the model's attention cache reused across a dialog's turns), the reply streamed."""

    calls_tools = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        worker: ModelWorker,
        max_new_tokens: int,
        sampling: Any,
        speak: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.worker = model, tokenizer, worker
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.speak = speak
        self.eot = tokenizer.convert_tokens_to_ids("<|EOT|>")
        call_ids = [tokenizer.convert_tokens_to_ids(t) for t in (TOOL_OPEN, TOOL_CLOSE)]
        known = all(isinstance(i, int) and i != tokenizer.unk_token_id for i in call_ids)
        self._call_ids: tuple[int, int] | None = (call_ids[0], call_ids[1]) if known else None

    def prompt(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None, speak: bool = True, max_new_tokens: int | None = None
    ) -> Generate:
        pieces, mels = chat_pieces(chat_turns(messages, tools if self._call_ids else None, speak))
        return Generate(piece_ids(self.tokenizer, pieces), mels, max_new_tokens or self.max_new_tokens)

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str | ToolCall | ModelIds, None]:
        reader = ReplyReader(self.tokenizer, self._call_ids)
        async for token in self._generate(lambda: self.prompt(messages, tools, self.speak, max_new_tokens), self.sampling):
            for item in reader.read(token):
                yield item

    async def listen(self, window: np.ndarray) -> None:
        """A whole 25 s window of the user's speech, through the encoder while they go on."""
        await self.worker.run(self._encode_ahead, window)

    def _encode_ahead(self, window: np.ndarray) -> None:
        self.model.encode_ahead(log_mel(window))

    async def transcribe(self, audio: np.ndarray) -> str:
        """The user's words, by the reference's ASR prompt (greedy)."""
        from models.stepaudio2_lm import Sampling

        messages = [Message("system", ASR_PROMPT), Message("user", "", audio=audio)]
        limit = transcript_limit(audio)
        ids = [t async for t in self._generate(lambda: self.prompt(messages, speak=False, max_new_tokens=limit), Sampling(0.0, 1.0, 1.0))]
        return self.tokenizer.decode([i for i in ids if i < TEXT_ID_LIMIT], skip_special_tokens=True).strip()

    async def _generate(self, build: Callable[[], Generate], sampling: Any) -> AsyncGenerator[int, None]:
        """The reply's ids up to its `<|EOT|>` (not included); the prompt is built in the worker
        (the log-mel is work too)."""

        def produce(post: Callable[[int], None], stop: threading.Event) -> None:
            job = build()
            tokens = self.model.generate(job.ids, job.mels, sampling, job.max_new_tokens, frozenset({self.eot}))
            try:
                for token in tokens:
                    if stop.is_set():
                        return
                    post(token)
            finally:
                tokens.close()

        async for token in thread_stream(self.worker, produce):
            if token == self.eot:
                return
            yield token

    async def aclose(self) -> None:
        return None
