"""LM backends without the embedded weights: a tiny random transformers model the test builds, and an
OpenAI-compatible streaming server the test runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import pytest
from aiohttp import web

from models.base import Message
from models.openai_lm import LMServiceError, OpenAICompatibleLM
from models.transformers_lm import TransformersLM
from runtime.workers import ModelWorker
from testkit.local import free_port
from tests.fakes import serve

pytestmark = pytest.mark.models

MESSAGES = [Message("system", "Be brief."), Message("user", "Hello there")]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(path: Path) -> None:
    """A 2-layer random Llama with a byte-level tokenizer and a chat template, saved as a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    vocab = {symbol: i for i, symbol in enumerate(alphabet + specials)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>", additional_special_tokens=specials[:1]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1 << 20, eos_token_id=None, pad_token_id=vocab["<|pad|>"],
    )
    import torch

    # Seeded, so that every run builds the same model.
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(path)
    return path


@pytest.fixture
def tiny_lm(tiny_model):
    """Builds TransformersLMs over the tiny model; their worker threads close at teardown."""
    workers: list[ModelWorker] = []

    def make(max_new_tokens: int) -> TransformersLM:
        workers.append(ModelWorker("lm-test"))
        return TransformersLM(tiny_model, workers[-1], max_new_tokens, temperature=0.0, threads=1)

    yield make
    for worker in workers:
        worker.close()


async def full_reply(lm: TransformersLM, messages: list[Message]) -> list[str]:
    async with aclosing(lm.stream(messages)) as stream:
        return [delta async for delta in stream]


async def test_hf_backend_streams_text_deltas(tiny_lm):
    lm = tiny_lm(40)
    deltas = await full_reply(lm, MESSAGES)
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    assert await full_reply(lm, MESSAGES) == deltas  # greedy decoding is deterministic


async def test_hf_backend_reuses_the_cache_of_the_previous_turn(tiny_lm):
    lm = tiny_lm(12)
    reply = "".join(await full_reply(lm, MESSAGES))
    assert lm.reused_tokens == 0
    assert await full_reply(lm, [*MESSAGES, Message("assistant", reply), Message("user", "And then?")])
    # The second prompt starts with the first prompt: at least that much came from the cache.
    first_prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert lm.reused_tokens >= lm.count_tokens(first_prompt) > 10


async def test_hf_backend_stops_within_a_step_when_the_stream_closes(tiny_lm):
    lm = tiny_lm(1_000_000)
    async with aclosing(lm.stream(MESSAGES)) as stream:
        await anext(stream)
    closed_at = time.monotonic()
    # A million tokens would take many minutes; a stopped generation frees the worker at once.
    async with asyncio.timeout(5):
        await lm.worker.run(lambda: None)
    assert time.monotonic() - closed_at < 5
    assert lm.worker.busy == 0


def test_hf_backend_needs_a_chat_template(tmp_path, tiny_model):
    import shutil

    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model, copy)
    for name in ("chat_template.jinja",):
        (copy / name).unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    worker = ModelWorker("lm-test")
    try:
        with pytest.raises(ValueError, match="chat template"):
            TransformersLM(copy, worker, max_new_tokens=4, temperature=0.0, threads=1)
    finally:
        worker.close()


class FakeChatServer:
    """Speaks the OpenAI chat-completions streaming protocol (server-sent events), as vLLM does."""

    def __init__(self, words: list[str], delay_s: float = 0.0, status: int = 200) -> None:
        self.words = words
        self.delay_s = delay_s
        self.status = status
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.disconnected = asyncio.Event()
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.headers.append(dict(request.headers))
        if self.status != 200:
            return web.json_response({"error": {"message": "model overloaded"}}, status=self.status)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            first = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            await response.write(f"data: {json.dumps(first)}\n\n".encode())
            await response.write(b": keep-alive comment\n\n")
            for word in self.words:
                await asyncio.sleep(self.delay_s)
                chunk = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.sent += 1
            done = {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


@pytest.fixture
async def chat_server():
    runners: list[web.AppRunner] = []

    async def start(fake: FakeChatServer) -> str:
        runners.append(await serve(fake))
        return fake.url

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_openai_backend_streams_and_sends_the_request(chat_server):
    fake = FakeChatServer(["The", " capital", " is", " Paris."])
    lm = OpenAICompatibleLM(await chat_server(fake), "tiny", "sk-test", max_new_tokens=32, temperature=0.0)
    try:
        async with aclosing(lm.stream(MESSAGES)) as stream:
            deltas = [delta async for delta in stream]
    finally:
        await lm.aclose()
    assert deltas == ["The", " capital", " is", " Paris."]
    request = fake.requests[0]
    assert request["stream"] is True and request["model"] == "tiny" and request["max_tokens"] == 32
    assert request["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"


async def test_openai_backend_closing_the_stream_drops_the_connection(chat_server):
    fake = FakeChatServer([f" w{i}" for i in range(200)], delay_s=0.02)
    lm = OpenAICompatibleLM(await chat_server(fake), "tiny", None, max_new_tokens=256, temperature=0.0)
    try:
        async with aclosing(lm.stream(MESSAGES)) as stream:
            await anext(stream)
        async with asyncio.timeout(5):
            await fake.disconnected.wait()
        assert fake.sent < 50
        assert "Authorization" not in fake.headers[0]
    finally:
        await lm.aclose()


async def _reply_error(lm: OpenAICompatibleLM) -> str:
    try:
        with pytest.raises(LMServiceError) as failed:
            async with aclosing(lm.stream(MESSAGES)) as stream:
                async for _ in stream:
                    pass
    finally:
        await lm.aclose()
    return str(failed.value)


async def test_openai_backend_reports_http_errors(chat_server):
    lm = OpenAICompatibleLM(await chat_server(FakeChatServer([], status=503)), "tiny", None, 8, 0.0)
    message = await _reply_error(lm)
    assert "HTTP 503" in message and "overloaded" in message


async def test_openai_backend_reports_an_unreachable_endpoint():
    lm = OpenAICompatibleLM("http://127.0.0.1:9/v1", "tiny", None, 8, 0.0, timeout_s=2)
    assert "127.0.0.1:9" in await _reply_error(lm)


@contextlib.asynccontextmanager
async def running_lm_server(slots: int, threads: int) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """run_lm_server.py, and its API's base URL once it listens; killed at the end if still up."""
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "run_lm_server.py", "--port", str(port), "--slots", str(slots), "--threads", str(threads),
        cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        async with asyncio.timeout(120):  # the line it logs once it listens
            while b"lm_server.listening" not in (line := await server.stdout.readline()):
                assert line, "the LM server exited"
        assert f"127.0.0.1:{port}/v1".encode() in line, line
        yield server, f"http://127.0.0.1:{port}/v1"
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


async def test_the_shared_lm_server_answers_workers_at_once():
    """run_lm_server.py: the embedded LM behind llama.cpp's own OpenAI-compatible server, which the
    `openai` backend of each worker streams from, two conversations at once in its slots; SIGTERM
    stops it."""
    async with running_lm_server(slots=2, threads=2) as (server, url):
        lms = [OpenAICompatibleLM(url, "smollm2", None, 24, 0.0) for _ in range(2)]

        async def answer(lm: OpenAICompatibleLM, question: str) -> str:
            async with aclosing(lm.stream([Message("system", "Be brief."), Message("user", question)])) as stream:
                return "".join([piece async for piece in stream if isinstance(piece, str)])

        answers = await asyncio.wait_for(
            asyncio.gather(answer(lms[0], "What is the capital of France?"), answer(lms[1], "Name a colour.")), 60
        )
        assert all(a.strip() for a in answers), answers
        for lm in lms:
            await lm.aclose()
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
