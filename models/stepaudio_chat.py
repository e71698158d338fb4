"""Step-Audio-Chat: its prompt format and its two backends (local transformers, or a vLLM server).

The prompt is `<|BOT|>{role}\\n{content}<|EOT|>` per message, user turns as role `human`, ending with
`<|BOT|>assistant\\n`. The current user turn is the utterance's `<audio_N>` string; earlier turns stay
text.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from models.base import LanguageModel, Message
from models.openai_lm import OpenAICompatibleLM
from runtime.audio_tokens import TOKENS_PER_SECOND
from runtime.workers import ModelWorker

BOT, EOT = "<|BOT|>", "<|EOT|>"
DEFAULT_SYSTEM = "You are a helpful assistant."
ASR_SYSTEM = "请记录下你所听到的语音内容。"
_ROLES = {"system": "system", "user": "human", "human": "human", "assistant": "assistant"}
# Step-Audio's generation defaults.
TOP_P = 0.9


def chat_prompt(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for `messages`; `tools`, OpenAI-style JSON schemas, follow the system message
    in a `tool_json_schemas` turn. An assistant turn's calls are written as the JSON it would have
    emitted, and a function's output as a `tool` turn (Step-Audio never published its call syntax:
    this is our guess, README)."""
    turns = list(messages)
    if not turns or turns[0].role != "system":
        turns.insert(0, Message("system", DEFAULT_SYSTEM))
    if tools:
        turns.insert(1, Message("tool_json_schemas", json.dumps(tools, ensure_ascii=False)))
    parts = [f"{BOT}{_ROLES.get(m.role, m.role)}\n{_content(m)}{EOT}" for m in turns]
    return "".join(parts) + f"{BOT}assistant\n"


def _content(message: Message) -> str:
    if not message.tool_calls:
        return message.content
    calls = [{"name": c.name, "arguments": _json_or_text(c.arguments)} for c in message.tool_calls]
    return message.content + json.dumps(calls if len(calls) > 1 else calls[0], ensure_ascii=False)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        return text


def transcription_prompt(audio_text: str) -> list[Message]:
    """Step-Audio's ASR with the Chat model: the fixed system prompt, then the audio."""
    return [Message("system", ASR_SYSTEM), Message("user", audio_text)]


async def transcribe(chat: LanguageModel, audio_text: str) -> str:
    """The transcript of one utterance's `<audio_N>` string, from the Chat model; room for about
    eight tokens per second of speech, whatever the reply limit is."""
    seconds = audio_text.count("<audio_") / TOKENS_PER_SECOND
    parts: list[str] = []
    stream = chat.stream(transcription_prompt(audio_text), max_new_tokens=16 + math.ceil(8 * seconds))
    async with contextlib.aclosing(stream) as deltas:
        async for delta in deltas:
            parts.append(delta)
    return "".join(parts).strip()


def use_optimus_kernels(model_dir: Path) -> Path | None:
    """Point OPTIMUS_LIB_PATH at the attention kernels shipped in `model_dir/lib` (the modeling code
    reads it at import); an explicit setting wins. None when there are none: attention then takes
    the modeling code's slower path."""
    if os.environ.get("OPTIMUS_LIB_PATH"):
        return Path(os.environ["OPTIMUS_LIB_PATH"])
    lib = model_dir / "lib"
    if lib.is_dir():
        os.environ["OPTIMUS_LIB_PATH"] = str(lib)
        return lib
    return None


def local_chat(
    model_dir: Path, worker: ModelWorker, max_new_tokens: int, temperature: float, threads: int
) -> LanguageModel:
    """Step-Audio-Chat in this process: its own modeling code, bf16, spread over the GPUs."""
    import torch

    from models.transformers_lm import TransformersLM

    use_optimus_kernels(model_dir)
    return TransformersLM(
        model_dir,
        worker,
        max_new_tokens,
        temperature,
        threads,
        prompt=chat_prompt,
        trust_remote_code=True,
        dtype=torch.bfloat16,
        device_map="auto",
    )


def served_chat(url: str, model: str, api_key: str | None, max_new_tokens: int, temperature: float) -> OpenAICompatibleLM:
    """Step-Audio-Chat behind an OpenAI-compatible server (StepFun's vLLM build): `/v1/completions`
    with the prompt built here, since the server takes the audio tokens as plain text."""
    return OpenAICompatibleLM(url, model, api_key, max_new_tokens, temperature, prompt=chat_prompt, top_p=TOP_P)
