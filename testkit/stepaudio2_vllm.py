"""StepFun's vLLM fork for Step-Audio 2 mini (branch `step-audio2-mini`), as far as its chat API
goes, for the tests: that fork cannot run here (it needs CUDA and is on no package registry), so
this serves its `POST /v1/chat/completions` the way its code does (read from the fork: the chat
template of `step_audio_2_tokenizer.py`, the stream of `serving_chat.py`, the calls of
`step_audio_2_tool_parser.py`), computed by our model code on the tests' tiny weights. Each request
it got is kept in `requests`."""

from __future__ import annotations

import base64
import io
import json
import re
import secrets
import threading
import time
import wave
from typing import Any, AsyncIterator, Callable

import numpy as np
from aiohttp import web

from models.base import ToolCall
from models.stepaudio2_chat import SPEAK, TOOL_CLOSE, TOOL_OPEN, ReplyReader
from models.stepaudio2_input import AUDIO_TOKEN_BASE, Audio, Content, Tokens, Turn, chat_pieces, piece_ids
from models.stepaudio2_lm import Sampling
from models.stepaudio2_speech import SPEECH_TOKENS, speech_tokens
from runtime.bridge import thread_stream
from runtime.workers import ModelWorker

AUDIO_TOKEN = re.compile(r"<audio_(\d+)>")
INTERLEAVE = 4  # the fork lays an earlier reply out again as one text id, then four audio ids


class StepAudio2Vllm:
    """Owns the stand-in server's model use: `chat` (a StepAudio2Chat on tiny weights) computes,
    one request at a time in its own worker."""

    def __init__(self, chat: Any, tool_parser: bool = True) -> None:
        """`tool_parser`: started with `--enable-auto-tool-choice --tool-call-parser step_audio_2`;
        without, a request with tools gets vLLM's HTTP 400."""
        self.chat, self.tokenizer = chat, chat.tokenizer
        self.tool_parser = tool_parser
        self.worker = ModelWorker("vllm-stand-in")
        self.requests: list[dict[str, Any]] = []
        self._special = {name: self.tokenizer.convert_tokens_to_ids(name) for name in ("<tts_start>", "<tts_end>", "<tts_pad>", TOOL_OPEN, TOOL_CLOSE)}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app

    def close(self) -> None:
        self.worker.close()

    # -- the prompt, as the fork's chat template lays it out -----------------------------------

    def turns(self, body: dict[str, Any]) -> list[Turn]:
        messages, tools = body["messages"], body.get("tools")
        turns: list[Turn] = []
        for index, m in enumerate(messages):
            role, content = m["role"], m.get("content")
            if role == "system" and index == 0:
                turns.append(Turn("system", content))
                if tools:
                    turns.append(Turn("tool_json_schemas", json.dumps(tools, ensure_ascii=False)))
            elif role == "human":
                turns.append(Turn("user", content if isinstance(content, str) else (Audio(np.concatenate([input_audio_samples(c) for c in content])),)))
            elif role == "assistant" and index == len(messages) - 1 and m.get("eot", True) is False:
                turns.append(Turn("assistant", content, eot=False))
            elif role == "assistant":
                parts: list[Content] = []
                if "tts_content" in m:
                    parts.append(Tokens(self._interleaved(m["tts_content"])))
                if content:
                    parts.append(content)
                for call in m.get("tool_calls") or []:
                    function = call["function"]
                    arguments = json.dumps(json.loads(function["arguments"]), ensure_ascii=False)
                    parts.append(f"{TOOL_OPEN}function\n{function['name']}\n{arguments}{TOOL_CLOSE}")
                turns.append(Turn("assistant", tuple(parts)))
            else:
                text = content if isinstance(content, str) else "".join(part["text"] for part in content)
                turns.append(Turn(role, text))
        if body.get("add_generation_prompt"):
            turns.append(Turn("assistant", None))
        return turns

    def _interleaved(self, tts: dict[str, str]) -> tuple[int, ...]:
        text = self.tokenizer(text=tts["tts_text"])["input_ids"]
        audio = [AUDIO_TOKEN_BASE + int(n) for n in AUDIO_TOKEN.findall(tts["tts_audio"])]
        chunks = max(-(-len(audio) // INTERLEAVE), len(text))
        text += [self._special["<tts_pad>"]] * (chunks - len(text))
        audio += [AUDIO_TOKEN_BASE + SPEECH_TOKENS] * (chunks * INTERLEAVE - len(audio))
        ids = [self._special["<tts_start>"]]
        for n in range(chunks):
            ids += [text[n], *audio[n * INTERLEAVE : (n + 1) * INTERLEAVE]]
        return (*ids, self._special["<tts_end>"])

    # -- the reply, streamed as the fork streams it ----------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if body.get("tools") and not self.tool_parser:
            detail = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            return web.json_response({"object": "error", "message": detail, "type": "BadRequestError", "code": 400}, status=400)
        pieces, mels = chat_pieces(self.turns(body))
        ids = piece_ids(self.tokenizer, pieces)
        temperature = float(body.get("temperature", 1.0))
        sampling = Sampling(0.0, 1.0, 1.0) if temperature == 0 else Sampling(temperature=temperature)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": f"chatcmpl-{secrets.token_hex(8)}", "object": "chat.completion.chunk", "created": int(time.time()), "model": body["model"]}
        speaking = bool(body.get("continue_final_message")) and body["messages"][-1].get("content") == SPEAK
        try:
            async for delta in self._deltas(self._ids(ids, mels, sampling, int(body["max_tokens"])), speaking):
                await response.write(f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': None}]})}\n\n".encode())
            done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        except ConnectionResetError:  # the client let go: the generation stops with its iterator
            pass
        return response

    async def _ids(self, ids: list[int], mels: list[Any], sampling: Sampling, limit: int) -> AsyncIterator[int]:
        def produce(post: Callable[[int], None], stop: threading.Event) -> None:
            tokens = self.chat.model.generate(ids, mels, sampling, limit, frozenset({self.chat.eot}))
            try:
                for token in tokens:
                    if stop.is_set() or token == self.chat.eot:
                        return
                    post(token)
            finally:
                tokens.close()

        async for token in thread_stream(self.worker, produce):
            yield token

    async def _deltas(self, ids: AsyncIterator[int], speaking: bool) -> AsyncIterator[dict[str, Any]]:
        """The ids read as our client of the model reads them (text, ids, calls), sent as the fork
        sends them: text and audio in `tts_content` until `<tts_end>`, calls as tool-call deltas."""
        reader = ReplyReader(self.tokenizer, (self._special[TOOL_OPEN], self._special[TOOL_CLOSE]))
        calls = 0
        async for token in ids:
            for item in reader.read(token):
                if isinstance(item, ToolCall):
                    tool = {"index": calls, "type": "function", "id": f"chatcmpl-tool-{secrets.token_hex(8)}", "function": {"name": item.name}}
                    yield {"tool_calls": [tool]}
                    arguments = json.dumps(json.loads(item.arguments), ensure_ascii=False)
                    yield {"tool_calls": [{"index": calls, "function": {"arguments": arguments}}]}
                    calls += 1
                elif isinstance(item, str):
                    yield {"content": "", "tts_content": {"tts_text": item, "tts_audio": ""}} if speaking else {"content": item}
                elif item.ids == (self._special["<tts_end>"],):
                    speaking = False
                elif speaking and speech_tokens(item.ids):
                    yield {"content": "", "tts_content": {"tts_text": "", "tts_audio": f"<audio_{speech_tokens(item.ids)[0]}>"}}


def input_audio_samples(part: dict[str, Any]) -> np.ndarray:
    """One `input_audio` part's wav (16 kHz mono 16-bit) as float samples."""
    with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2), "16 kHz mono 16-bit wav"
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32) / 32767.0
