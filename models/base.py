"""The interfaces of the models the controller drives: an LM streaming text, a decoder streaming PCM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Protocol, runtime_checkable

import numpy as np


class ModelSetupError(RuntimeError):
    """What a profile was pointed at cannot be used (a missing directory, a malformed voice file);
    the message says what and where."""


@dataclass(frozen=True)
class ToolCall:
    """A function the LM asked for: its call id, the function's name, and the arguments as the JSON
    text the LM wrote (parsed by whoever runs it: a malformed one is the tool's error, not ours)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user", "assistant", or "tool" (a function's output)
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # which call a "tool" message answers
    # For an LM that hears speech and speaks in its own ids (Step-Audio 2): a user turn's 16 kHz
    # audio, and an assistant turn as the ids it wrote (the heard part of them). Others read `content`.
    audio: np.ndarray | None = field(default=None, compare=False, repr=False)
    ids: tuple[int, ...] = field(default=(), repr=False)

    def to_openai(self) -> dict[str, Any]:
        """The message in the OpenAI chat format."""
        if self.role == "tool":
            return {"role": "tool", "tool_call_id": self.tool_call_id, "content": self.content}
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["content"] = self.content or None
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls
            ]
        return out


def plain_messages(messages: list[Message]) -> list[Message]:
    """The messages for an LM that knows no tools: each call and its output as text it can read."""
    out: list[Message] = []
    for m in messages:
        if m.role == "tool":
            out.append(Message("user", f"(result of a function: {m.content})"))
        elif m.tool_calls:
            calls = "; ".join(f"{c.name}({c.arguments})" for c in m.tool_calls)
            out.append(Message("assistant", f"{m.content} (calling {calls})".strip()))
        else:
            out.append(m)
    return out


@dataclass(frozen=True)
class ModelIds:
    """Ids an LM wrote for its own speech decoder (Step-Audio 2's interleaved text and audio
    tokens): they go from the LM's stream through the reply to the decoder, and the history keeps
    the heard part of them."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class SpeechChunk:
    """Synthesized audio and the text it speaks (the context keeps only what was heard)."""

    pcm: np.ndarray  # mono float32 or int16
    sample_rate: int
    text: str
    ids: tuple[int, ...] = ()  # the LM's ids this audio speaks, for a decoder of ModelIds

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / self.sample_rate


class LanguageModel(Protocol):
    """Streams the reply's text deltas; cancelling the consumer stops generation within one step.
    `max_new_tokens`, when given, replaces the model's own limit for this generation. `tools`,
    OpenAI-style function schemas, are offered to an LM that can call them (`calls_tools`): it then
    yields a `ToolCall` for each call it makes, after its text, and ends; one that cannot ignores
    them. An LM with its own speech decoder also yields the `ModelIds` that decoder reads."""

    calls_tools: bool

    def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str | ToolCall | ModelIds, None]: ...

    async def aclose(self) -> None:
        """Free what the engine holds (threads, connections, caches); once no stream is running."""


@runtime_checkable
class PromptCache(Protocol):
    """An LM that keeps evaluated prompts: a turn's start, known while the user still speaks, can
    be read ahead so that the reply's prompt evaluates only the rest."""

    async def prefill(self, messages: list[Message]) -> None:
        """Evaluate the prompt of `messages` now, for a later stream whose prompt starts the same."""
        ...


class SpeechDecoder(Protocol):
    """Turns a stream of text deltas into a stream of speech chunks; cancelling drops pending work.
    A decoder paired with an LM that writes `ModelIds` speaks those, and the text only labels them."""

    def synthesize(self, text: AsyncIterator[str | ModelIds]) -> AsyncGenerator[SpeechChunk, None]: ...

    async def aclose(self) -> None:
        """Free what the decoder holds (a process, caches); once nothing is being synthesized."""
