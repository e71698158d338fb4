"""Step-Audio 2 mini served by a vLLM that speaks it (StepFun's fork, branch `step-audio2-mini`):
the dialog sent as that server's chat messages, as StepFun's client (`stepaudio2vllm.py`) sends
them, and the reply read from its stream as text, the audio ids for token2wav, and function calls."""

from __future__ import annotations

import base64
import io
import re
import wave
from typing import Any, AsyncGenerator, Sequence

import numpy as np
import structlog

from models.base import Message, ModelIds, ToolCall
from models.openai_lm import CallAssembler, Endpoint, LMRefused
from models.stepaudio2_chat import ASR_PROMPT, SPEAK, transcript_limit
from models.stepaudio2_input import AUDIO_TOKEN_BASE, SAMPLE_RATE, WINDOW_SAMPLES
from models.stepaudio2_speech import speech_tokens

AUDIO_TOKEN = re.compile(r"<audio_(\d+)>")
# What the server may leave in a text delta when it keeps special tokens (it does once functions
# are offered, to see the calls): markers of the reply's layout, never words.
MARKERS = re.compile(r"<tts_start>|<tts_end>|<tts_pad>|<\|EOT\|>|<\|BOT\|>|<audio_\d+>")
TOP_P, REPETITION_PENALTY = 0.9, 1.05  # as the reference's examples sample

log = structlog.get_logger(__name__)


def wav_base64(samples: np.ndarray) -> str:
    """16 kHz float samples as the base64 of a 16-bit mono wav file, truncated to 16 bits as
    StepFun's client writes them (not rounded), so the server hears the samples it would."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def audio_parts(audio: np.ndarray) -> list[dict[str, Any]]:
    """A user turn's speech as the server takes it: one `input_audio` part per 25 s window."""
    return [
        {"type": "input_audio", "input_audio": {"data": wav_base64(audio[start : start + WINDOW_SAMPLES]), "format": "wav"}}
        for start in range(0, len(audio), WINDOW_SAMPLES)
    ]


def served_messages(messages: Sequence[Message], speak: bool = True) -> list[dict[str, Any]]:
    """The dialog in the server's chat format: the user as `human` (their speech, else their
    words), earlier spoken replies as `tts_content` (their text and `<audio_N>` tokens: the heard
    part, after a barge-in), calls as `tool_calls`, a function's output in an `input` turn; then,
    to speak, the reply opened with `<tts_start>` for the server to continue."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "system":
            out.append({"role": "system", "content": m.content})
        elif m.role == "user":
            out.append({"role": "human", "content": audio_parts(m.audio) if m.audio is not None and len(m.audio) else m.content})
        elif m.role == "tool":
            out.append({"role": "input", "tool_call_id": m.tool_call_id, "content": [{"type": "text", "text": m.content}]})
        else:
            turn: dict[str, Any] = {"role": "assistant"}
            spoken = speech_tokens(m.ids)
            if spoken:
                turn["tts_content"] = {"tts_text": m.content, "tts_audio": "".join(f"<audio_{n}>" for n in spoken)}
            else:
                turn["content"] = m.content
            if m.tool_calls:
                turn["tool_calls"] = m.to_openai()["tool_calls"]
            out.append(turn)
    if speak:
        out.append({"role": "assistant", "content": SPEAK, "eot": False})
    return out


class StepAudio2Served:
    """Owns the HTTP session to a server of Step-Audio 2 (`POST {url}/chat/completions`, streamed)
    as a LanguageModel: each reply one request that continues the opened `<tts_start>`; closing
    the stream closes the connection, which is how vLLM learns to stop."""

    def __init__(
        self, url: str, model: str, api_key: str | None, max_new_tokens: int, temperature: float, timeout_s: float = 30.0
    ) -> None:
        self.endpoint = Endpoint(url.rstrip("/") + "/chat/completions", api_key, timeout_s)
        self.calls_tools = True  # until the server refuses them
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    def body(
        self, messages: Sequence[Message], tools: list[dict[str, Any]] | None, speak: bool, max_new_tokens: int, temperature: float
    ) -> dict[str, Any]:
        """The request: a spoken reply continues the last message (`continue_final_message`) and
        samples as the reference's examples do; a written one (a transcription, greedy) starts a
        new assistant turn."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": served_messages(messages, speak),
            "stream": True,
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "continue_final_message": speak,
            "add_generation_prompt": not speak,
        }
        if speak:
            body |= {"top_p": TOP_P, "repetition_penalty": REPETITION_PENALTY}
        if tools:
            body["tools"] = tools
        return body

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str | ToolCall | ModelIds, None]:
        body = self.body(messages, tools if self.calls_tools else None, True, max_new_tokens or self.max_new_tokens, self.temperature)
        try:
            async for item in self._reply(body):
                yield item
        except LMRefused as refused:
            # vLLM started without `--enable-auto-tool-choice --tool-call-parser step_audio_2`
            # answers 400 to any request with tools: from now on this LM is one that cannot call.
            if refused.status != 400 or "tools" not in body:
                raise
            log.warning("lm.tools_refused", url=self.endpoint.url, detail=refused.detail)
            self.calls_tools = False
            del body["tools"]
            async for item in self._reply(body):
                yield item

    async def _reply(self, body: dict[str, Any]) -> AsyncGenerator[str | ToolCall | ModelIds, None]:
        calls = CallAssembler()
        async for event in self.endpoint.events(body):
            text = calls.take(event)
            tts = _delta(event).get("tts_content") or {}
            text = MARKERS.sub("", tts.get("tts_text") or text)
            if text:
                yield text
            audio = tuple(AUDIO_TOKEN_BASE + int(n) for n in AUDIO_TOKEN.findall(tts.get("tts_audio") or ""))
            if audio:
                yield ModelIds(audio)
        for call in calls.finished():
            yield call

    async def transcribe(self, audio: np.ndarray) -> str:
        """The user's words, by the reference's ASR prompt (greedy)."""
        messages = [Message("system", ASR_PROMPT), Message("user", "", audio=audio)]
        said = ""
        async for event in self.endpoint.events(self.body(messages, None, False, transcript_limit(audio), 0.0)):
            said += _delta(event).get("content") or ""
        return MARKERS.sub("", said).strip()

    async def aclose(self) -> None:
        await self.endpoint.aclose()


def _delta(event: dict[str, Any]) -> dict[str, Any]:
    choices = event.get("choices") or []
    return (choices[0].get("delta") or {}) if choices else {}
