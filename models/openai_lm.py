"""An LM behind any OpenAI-compatible streaming chat endpoint (vLLM, llama.cpp server, hosted APIs)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

import aiohttp

from models.base import Message


class LMServiceError(RuntimeError):
    """The endpoint refused the request or broke the stream; the message says how."""


class OpenAICompatibleLM:
    """Owns the HTTP session to one endpoint; each stream is one `POST {url}/chat/completions`, or,
    when `prompt` builds the prompt text itself, one `POST {url}/completions` (for models whose
    template the server does not know, such as Step-Audio-Chat behind vLLM).

    Closing the stream closes the connection, which is how such servers learn to stop generating.
    """

    def __init__(
        self,
        url: str,
        model: str,
        api_key: str | None,
        max_new_tokens: int,
        temperature: float,
        timeout_s: float = 30.0,
        prompt: Callable[[list[Message]], str] | None = None,
        top_p: float | None = None,
    ) -> None:
        self.url = url.rstrip("/") + ("/completions" if prompt else "/chat/completions")
        self._prompt = prompt
        self._top_p = top_p
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def stream(self, messages: list[Message], max_new_tokens: int | None = None) -> AsyncIterator[str]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
        }
        if self._prompt is not None:
            body["prompt"] = self._prompt(messages)
        else:
            body["messages"] = [{"role": m.role, "content": m.content} for m in messages]
        if self._top_p is not None:
            body["top_p"] = self._top_p
        try:
            async with self._session.post(self.url, json=body) as response:
                if response.status != 200:
                    detail = (await response.text())[:300]
                    raise LMServiceError(f"{self.url} answered HTTP {response.status}: {detail}")
                async for line in response.content:
                    delta = _delta(line)
                    if delta is _DONE:
                        return
                    if delta:
                        yield delta
        except aiohttp.ClientError as exc:
            raise LMServiceError(f"{self.url}: {exc!r}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


_DONE = object()


def _delta(line: bytes) -> str | object | None:
    """The text of one server-sent-events line of a (chat) completion stream."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None  # blank separators, comments and other fields carry no text
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return _DONE
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise LMServiceError(f"malformed stream event: {data[:200]!r}") from exc
    if "error" in event:
        raise LMServiceError(f"the endpoint reported an error: {event['error']}")
    choices = event.get("choices") or []
    if not choices:
        return None
    if "text" in choices[0]:  # /completions
        return choices[0]["text"] or None
    return (choices[0].get("delta") or {}).get("content") or None
