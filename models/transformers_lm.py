"""Local causal LMs through transformers: any saved model directory (`--lm hf:<directory>`), or
Step-Audio-Chat with its own modeling code."""

from __future__ import annotations

import functools
import threading
import warnings
from pathlib import Path
from typing import Any, AsyncGenerator, Callable

import structlog

from models.base import Message, plain_messages
from models.generation import stopping_on
from runtime.bridge import Post, thread_stream
from runtime.workers import ModelWorker

log = structlog.get_logger()


class PrefixCache:
    """Owns the attention (KV) caches of the last few generations, so that a dialog's next turn,
    whose prompt begins with the previous prompt and reply, only prefills what is new. On two CPU
    cores prefill runs at a few hundred tokens a second: without this, first-token time grows
    with the history."""

    MIN_REUSE = 16

    def __init__(self, entries: int = 4) -> None:
        self.entries = entries
        self._items: list[tuple[list[int], Any]] = []
        self._lock = threading.Lock()

    def take(self, ids: list[int]) -> tuple[Any, int]:
        """A private copy of the cache with the longest common prefix (cropped to it), and its length."""
        import copy

        with self._lock:
            best, length = None, 0
            for tokens, cache in self._items:
                common = _common_prefix(tokens, ids)
                if common > length:
                    best, length = cache, common
            length = min(length, len(ids) - 1)  # at least one token must go through the model
            if best is None or length < self.MIN_REUSE:
                return None, 0
            reused = copy.deepcopy(best)
        surplus = reused.get_seq_length() - length
        if surplus > 0:
            reused.crop(-surplus)
        return reused, length

    def put(self, tokens: list[int], cache: Any) -> None:
        with self._lock:
            self._items.append((tokens[: cache.get_seq_length()], cache))
            del self._items[: -self.entries]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TransformersLM:
    """Owns one transformers causal LM and its tokenizer; generation runs in the worker thread.

    Each generation step checks a stop flag that closing the stream sets, so a cancelled reply
    frees the worker within one step.
    """

    def __init__(
        self,
        path: Path,
        worker: ModelWorker,
        max_new_tokens: int,
        temperature: float,
        threads: int,
        prompt: Callable[[list[Message], list[dict[str, Any]] | None], str] | None = None,
        **load: Any,
    ) -> None:
        """`prompt`, when given, builds the prompt text in place of the tokenizer's chat template;
        `load` goes to from_pretrained (default float32 on the CPU)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.worker = worker
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self._prompt = prompt
        remote = bool(load.get("trust_remote_code"))
        self._tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
        self._model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": torch.float32} | load)).eval()
        self.prefix_cache = PrefixCache()
        self.reused_tokens = 0  # prompt tokens served from the prefix cache, over all generations
        if prompt is None and self._tokenizer.chat_template is None:
            raise ValueError(f"{path}: the tokenizer has no chat template")

    async def aclose(self) -> None:
        """Drop the kept attention caches; the weights go with the last reference to this LM."""
        self.prefix_cache = PrefixCache()

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    calls_tools = False  # a `prompt` that shows the model tools gets a JSON reader around it

    def stream(
        self, messages: list[Message], max_new_tokens: int | None = None, tools: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[str, None]:
        limit = max_new_tokens or self.max_new_tokens
        return thread_stream(self.worker, functools.partial(self.generate_now, messages, limit, tools))

    def _inputs(self, messages: list[Message], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The prompt's tensors on the model's device: the `prompt` builder's text, or the chat template's."""
        if self._prompt is not None:
            inputs = self._tokenizer(self._prompt(messages, tools), return_tensors="pt", add_special_tokens=True)
        else:
            inputs = self._tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in plain_messages(messages)],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        return {k: v.to(self._model.device) for k, v in inputs.items()}

    def generate_now(
        self, messages: list[Message], max_new_tokens: int, tools: list[dict[str, Any]] | None, post: Post[str], stop: threading.Event
    ) -> None:
        """Blocking: generate a reply, posting each text delta; ends at the first step after `stop`."""
        import torch
        from transformers import DynamicCache
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self._tokenizer

        class Streamer(BaseStreamer):
            """Posts the text each new token adds (a word need not be complete: the speech chunker
            joins the pieces), holding back only an unfinished multi-byte character."""

            def __init__(self) -> None:
                self.prompt_seen = False
                self.tokens: list[int] = []
                self.sent = 0

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() hands over the prompt first
                    self.prompt_seen = True
                    return
                self.tokens.extend(value.reshape(-1).tolist())
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > self.sent:
                    post(text[self.sent :])
                    self.sent = len(text)

            def end(self) -> None:
                text = tokenizer.decode(self.tokens, skip_special_tokens=True)
                if len(text) > self.sent:
                    post(text[self.sent :])

        inputs = self._inputs(messages, tools)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": self.temperature, "top_p": 0.9}
            if self.temperature > 0
            else {"do_sample": False}
        )
        # `past_key_values` is the name that works across transformers 4.5x and 5.x.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        ids = inputs["input_ids"][0].tolist()
        cache, reused = self.prefix_cache.take(ids)
        self.reused_tokens += reused
        with torch.inference_mode():
            out = self._model.generate(
                **inputs,
                past_key_values=cache if cache is not None else DynamicCache(),
                return_dict_in_generate=True,
                max_new_tokens=max_new_tokens,
                repetition_penalty=1.1,
                streamer=Streamer(),
                stopping_criteria=stopping_on(stop),
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                **sampling,
            )
        self.prefix_cache.put(out.sequences[0].tolist(), out.past_key_values)
