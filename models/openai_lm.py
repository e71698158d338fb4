"""An LM behind any OpenAI-compatible streaming chat endpoint (vLLM, llama.cpp server, hosted APIs)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

import aiohttp
import structlog

from models.base import Message, ToolCall, plain_messages

log = structlog.get_logger(__name__)


class LMServiceError(RuntimeError):
    """The endpoint refused the request or broke the stream; the message says how."""


class LMRefused(LMServiceError):
    """The endpoint answered with an HTTP status other than 200."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class _ToolsRefused(Exception):
    """HTTP 400 to a request that offered tools."""


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
        prompt: Callable[[list[Message], list[dict[str, Any]] | None], str] | None = None,
        top_p: float | None = None,
    ) -> None:
        self.endpoint = Endpoint(url.rstrip("/") + ("/completions" if prompt else "/chat/completions"), api_key, timeout_s)
        self.calls_tools = prompt is None  # a prompt built here is a model's own business (Step-Audio)
        self._prompt = prompt
        self._top_p = top_p
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature

    async def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncIterator[str | ToolCall]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
        }
        if self._prompt is not None:
            body["prompt"] = self._prompt(messages, tools)
        else:
            body["messages"] = [m.to_openai() for m in (messages if self.calls_tools else plain_messages(messages))]
            if tools and self.calls_tools:
                body["tools"] = tools
        if self._top_p is not None:
            body["top_p"] = self._top_p
        calls = CallAssembler()
        try:
            async for text in self._post(body, calls):
                yield text
        except _ToolsRefused as refused:
            # Many servers refuse `tools` unless started for them (vLLM without a tool parser):
            # from now on this LM is one that cannot call, and the rule stands in.
            log.warning("lm.tools_refused", url=self.endpoint.url, detail=str(refused))
            self.calls_tools = False
            body.pop("tools")
            body["messages"] = [m.to_openai() for m in plain_messages(messages)]
            async for text in self._post(body, calls):
                yield text
        for call in calls.finished():
            yield call

    async def _post(self, body: dict[str, Any], calls: CallAssembler) -> AsyncIterator[str]:
        """One streamed request: its text; its tool-call pieces go to `calls`."""
        try:
            async for event in self.endpoint.events(body):
                text = calls.take(event)
                if text:
                    yield text
        except LMRefused as refused:
            if refused.status == 400 and "tools" in body:
                raise _ToolsRefused(refused.detail) from None
            raise

    async def aclose(self) -> None:
        await self.endpoint.aclose()


class Endpoint:
    """Owns the HTTP session to one streaming (chat) completion URL, with its key and timeouts;
    the session opens at the first request."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def events(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return completion_events(self._session, self.url, body)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def completion_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST `body` to a streaming (chat) completion endpoint: each event of its answer, up to
    `[DONE]`; LMRefused for another status than 200, LMServiceError for a broken stream."""
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                raise LMRefused(url, response.status, (await response.text())[:300])
            async for line in response.content:
                event = _event(line)
                if event is _DONE:
                    break
                if isinstance(event, dict):
                    yield event
    except aiohttp.ClientError as exc:
        raise LMServiceError(f"{url}: {exc!r}") from exc


_DONE = object()


def _event(line: bytes) -> dict[str, Any] | object | None:
    """One server-sent-events line of a (chat) completion stream: its JSON, _DONE, or None."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None  # blank separators, comments and other fields carry no data
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return _DONE
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise LMServiceError(f"malformed stream event: {data[:200]!r}") from exc
    if not isinstance(event, dict):
        raise LMServiceError(f"malformed stream event: {data[:200]!r}")
    if "error" in event:
        raise LMServiceError(f"the endpoint reported an error: {event['error']}")
    return event


class CallAssembler:
    """Joins the tool calls of a streamed chat completion: each arrives as deltas keyed by its
    index, the id and name in the first, the arguments cut anywhere across the rest."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def take(self, event: dict[str, Any]) -> str:
        """The text this event adds; its tool-call pieces are kept."""
        choices = event.get("choices") or []
        if not choices:
            return ""
        choice = choices[0]
        if "text" in choice:  # /completions
            return choice["text"] or ""
        delta = choice.get("delta") or {}
        for piece in delta.get("tool_calls") or []:
            call = self._calls.setdefault(int(piece.get("index", len(self._calls))), {"id": "", "name": "", "arguments": ""})
            function = piece.get("function") or {}
            call["id"] = piece.get("id") or call["id"]
            call["name"] = function.get("name") or call["name"]
            call["arguments"] += function.get("arguments") or ""
        return delta.get("content") or ""

    def finished(self) -> list[ToolCall]:
        return [
            ToolCall(c["id"] or f"call_{i}", c["name"], c["arguments"] or "{}")
            for i, c in sorted(self._calls.items())
            if c["name"]
        ]
