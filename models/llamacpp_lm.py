"""A GGUF LM in llama.cpp (the prebuilt `xllamacpp` wheel): one context whose parallel slots serve
every call at once (continuous batching), each slot keeping its conversation's prompt cached."""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncGenerator

import structlog

from models.base import Message, plain_messages
from runtime.bridge import Post, thread_stream
from runtime.workers import ModelWorker

log = structlog.get_logger()

REPEAT_PENALTY = 1.1  # greedy decoding of a small model loops without it
PROMPT_CACHE_MIB = 64  # prompts kept in host memory for slots that lost theirs (llama.cpp's default is 8 GiB)


class LlamaCppError(RuntimeError):
    """llama.cpp refused a request or failed in it; the message is its own."""


@dataclass
class PromptUse:
    """How one generation's prompt was evaluated: `cached` tokens came from a slot's cache, only
    `evaluated` ones went through the model."""

    cached: int = 0
    evaluated: int = 0


def llama_params(
    gguf: Path, threads: int, parallel: int, context_per_slot: int, busy_wait: bool, host: str, port: int, http_threads: int
) -> Any:
    """llama.cpp's server parameters for `gguf`: `parallel` slots of `context_per_slot` tokens,
    computed by `threads` threads, its HTTP listener on `host`:`port` (0: a free port)."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = parallel
    params.n_ctx = context_per_slot * parallel
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    if not busy_wait:
        params.cpuparams.poll = 0
        params.cpuparams_batch.poll = 0
    params.cache_ram_mib = PROMPT_CACHE_MIB
    params.n_threads_http = http_threads
    params.hostnames = [host]
    params.port = port
    params.warmup = True
    params.verbosity = -1
    return params


class LlamaCppLM:
    """Owns one llama.cpp server context for a GGUF file. `parallel` generations run at once in
    one batch; each waits in a thread of `worker` (it only blocks there: llama.cpp computes in its
    own threads, `threads` of them). A new prompt goes to the slot that already holds the longest
    part of it, so a dialog's next turn evaluates only what is new. Closing a stream stops its
    generation at the next token."""

    def __init__(
        self,
        gguf: Path,
        worker: ModelWorker,
        max_new_tokens: int,
        temperature: float,
        threads: int,
        parallel: int,
        context_per_slot: int = 2048,
        busy_wait: bool = False,
    ) -> None:
        """`busy_wait` keeps llama.cpp's default of compute threads that poll for work (measured
        by bench/loop_lag.py: they take the core the event loop needs)."""
        import xllamacpp

        # Its HTTP listener (127.0.0.1, a free port) is not used: requests go in by function call.
        params = llama_params(gguf, threads, parallel, context_per_slot, busy_wait, "127.0.0.1", 0, http_threads=1)
        self.worker = worker
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.parallel = parallel
        self.last_prompt = PromptUse()  # of the latest generation that finished its prompt
        self._server = xllamacpp.Server(params)

    calls_tools = False  # measured: SmolLM2-135M answers instead of calling (README, tools)

    def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str, None]:
        request = _chat_request(messages) | {
            "stream": True,
            "max_tokens": max_new_tokens or self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": 0.9,
            "repeat_penalty": REPEAT_PENALTY,
            "timings_per_token": True,
        }
        return thread_stream(self.worker, functools.partial(self.generate_now, request))

    async def prefill(self, messages: list[Message]) -> None:
        """Evaluate the prompt of `messages` into a slot now (and one token after it): a reply
        whose prompt starts the same goes to that slot and evaluates only what follows."""
        answer = await self.worker.run(self._server.handle_chat_completions, _chat_request(messages) | {"max_tokens": 1, "temperature": 0.0})
        if "choices" not in answer:
            raise LlamaCppError(str(answer.get("error", answer)))
        self._evaluated(answer.get("timings", {}), "lm.prefilled")

    def _evaluated(self, timings: dict[str, Any], event: str) -> None:
        """How a prompt went in, from llama.cpp's timings: kept as `last_prompt`, and logged."""
        self.last_prompt = PromptUse(timings.get("cache_n", 0), timings.get("prompt_n", 0))
        log.debug(event, cached=self.last_prompt.cached, evaluated=self.last_prompt.evaluated, ms=round(timings.get("prompt_ms", 0.0), 1))

    def generate_now(self, request: dict[str, Any], post: Post[str], stop: threading.Event) -> None:
        """Blocking: one streamed chat completion, posting each text delta; ends at the first token
        after `stop` is set."""
        failure: list[str] = []
        told = False  # how its prompt went in: the first chunk with timings says

        def on_chunk(chunk: dict[str, Any]) -> bool:
            nonlocal told
            timings = chunk.get("timings")
            if timings and not told:
                told = True
                self._evaluated(timings, "lm.prompt_evaluated")
            if stop.is_set():
                return True  # llama.cpp drops the generation when its stream is let go
            if "error" in chunk or "choices" not in chunk:
                failure.append(str(chunk.get("error", chunk)))
                return True
            for choice in chunk["choices"]:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    post(delta)
            return False

        self._server.handle_chat_completions(request, on_chunk)
        if failure:
            raise LlamaCppError(failure[0])

    async def next_token_probabilities(self, prompt: str, top: int = 30) -> dict[str, float]:
        """The probabilities of the `top` likeliest tokens after a raw `prompt` (no chat template)."""
        request = {"prompt": prompt, "max_tokens": 1, "n_probs": top, "temperature": 0, "cache_prompt": True}
        answer = await self.worker.run(self._server.handle_completions, request)
        if "choices" not in answer:
            raise LlamaCppError(str(answer.get("error", answer)))
        candidates = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {c["token"]: math.exp(c["logprob"]) for c in candidates}

    async def aclose(self) -> None:
        """Stop llama.cpp's threads and free the model; call it once no generation is running."""
        self._server = None  # type: ignore[assignment]


def _chat_request(messages: list[Message]) -> dict[str, Any]:
    """The part of a chat completion that makes its prompt: a prefill and the reply after it must
    lay the messages out alike."""
    return {"messages": [{"role": m.role, "content": m.content} for m in plain_messages(messages)], "cache_prompt": True}
