"""The stepaudio2 profile: Step-Audio 2 mini in a live call, on tiny weights in the published layout
that the tests build and teach (a speech reply with text between its audio tokens, a function call
when functions are offered), through the real controller, WebRTC and `/v1/realtime`; the model in
this process, and served as StepFun's vLLM fork serves it (testkit/stepaudio2_vllm.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

from context.dialog import DialogContext, Turn, heard_ids
from models.base import Message, ModelIds, ToolCall
from models.stepaudio2_input import AUDIO_TOKEN_BASE, Audio, Tokens, chat_pieces
from testkit.stepaudio_tiny import tone_speech

pytestmark = pytest.mark.models

SYSTEM = "Be brief."
SPOKEN = "Hi there, it is noon."  # what the taught model says, its audio tokens between the words
SPEECH_IDS = 24  # audio tokens after each 3 characters of it: 1 s of speech for each 3 of text


def builtin_tools() -> list[dict]:
    """The schemas a call offers the model with the built-in tools on."""
    from tools.toolbox import load_toolbox

    toolbox = load_toolbox(None, True, 5.0, 700)
    assert toolbox is not None
    return toolbox.schemas()


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    return tone_speech(seconds, 16000, seed).astype(np.float32)


def spoken_reply(text: str, seed: int) -> list[int]:
    """Interleaved as the model writes it: a few text ids, then the audio tokens that speak them
    (distinct tokens, so that each is learnt from the one before)."""
    audio = (np.random.default_rng(seed).permutation(6561)[: SPEECH_IDS * len(text)] + AUDIO_TOKEN_BASE).tolist()
    ids: list[int] = []
    for n in range(0, len(text), 3):
        ids += list(text[n : n + 3].encode()) + audio[n * SPEECH_IDS // 3 : (n + 3) * SPEECH_IDS // 3]
    return ids


# -- the prompt and the reply, as the reference lays them out ----------------------------------------


def test_a_dialog_is_laid_out_as_the_references_multi_turn_and_tool_examples():
    from models.stepaudio2_chat import chat_turns, tool_call_text

    heard, asked = speech(1.0, 1), speech(1.5, 2)
    call = ToolCall("call_1", "current_time", "{}")
    messages = [
        Message("system", SYSTEM),
        Message("user", "hello", audio=heard),
        Message("assistant", "Hi.", ids=(72, 105, AUDIO_TOKEN_BASE + 7)),
        Message("user", "what time is it", audio=asked),
        Message("assistant", "", (call,)),
        Message("tool", '{"time": "noon"}', tool_call_id="call_1"),
    ]
    tools = builtin_tools()
    turns = chat_turns(messages, tools)
    assert [(t.role, t.eot) for t in turns] == [
        ("system", True), ("tool_json_schemas", True), ("user", True), ("assistant", True),
        ("user", True), ("assistant", True), ("input", True), ("assistant", False),
    ]
    assert turns[1].content == json.dumps(tools, ensure_ascii=False)
    assert isinstance(turns[2].content, tuple) and turns[2].content[0].samples is heard  # the speech, not the transcript
    assert turns[3].content == ("<tts_start>", Tokens((72, 105, AUDIO_TOKEN_BASE + 7)))  # as the reference's aqaa example
    assert turns[5].content == ("<tool_call>function\ncurrent_time\n{}</tool_call>",) == (tool_call_text(call),)
    assert turns[6].content == '{"time": "noon"}' and turns[7].content == "<tts_start>"
    pieces, mels = chat_pieces(turns)
    assert len(mels) == 2 and pieces[-1] == "<|BOT|>assistant\n<tts_start>"
    # Text only where there is no speech (a typed message, an old transcript-only turn).
    assert chat_turns([Message("user", "typed")], speak=False)[0].content == "typed"
    assert chat_turns([Message("user", "typed")], speak=False)[-1].content is None


def test_the_reply_is_read_into_text_ids_for_the_decoder_and_calls(tokenizer):
    from models.stepaudio2_chat import StepAudio2Chat, ReplyReader

    call_ids = (tokenizer.convert_tokens_to_ids("<tool_call>"), tokenizer.convert_tokens_to_ids("</tool_call>"))
    reader = ReplyReader(tokenizer, call_ids)
    ids = [*"Hé".encode(), AUDIO_TOKEN_BASE + 5, call_ids[0], *b'function\ncurrent_time\n{"zone": "UTC"}', call_ids[1], *b"!"]
    out = [item for token in ids for item in reader.read(token)]
    text = "".join(i for i in out if isinstance(i, str))
    assert text == "Hé!"  # é's two bytes make one delta, once both are in
    spoken = [i for item in out if isinstance(item, ModelIds) for i in item.ids]
    assert spoken == [*"Hé".encode(), AUDIO_TOKEN_BASE + 5, *b"!"]  # the call's ids are not spoken or kept as speech
    assert [i for i in out if isinstance(i, ToolCall)] == [ToolCall("call_1", "current_time", '{"zone": "UTC"}')]
    assert StepAudio2Chat.calls_tools


def test_the_history_keeps_speech_and_ids_for_the_lm_and_only_text_in_the_transcript(tmp_path):
    from context.dialog import TranscriptStore

    store = TranscriptStore(tmp_path)
    context = DialogContext(SYSTEM, 1000, store, "s1")
    heard = speech(2.0)
    context.add(Turn("user", "", "completed", "item_1", audio=heard))
    context.add(Turn("assistant", "Hi", "interrupted", "resp_1", ids=(72, 105, AUDIO_TOKEN_BASE)))
    user, reply = context.messages()[1:]
    assert user.audio is heard and reply.ids == (72, 105, AUDIO_TOKEN_BASE) and reply.content == "Hi"
    records = [json.loads(line) for line in store.path("s1").read_text().splitlines()]
    assert all("audio" not in r and "ids" not in r for r in records) and records[1]["text"] == "Hi"
    # Speech costs its tokens: 2 s are 25 of them, more than this budget leaves.
    small = DialogContext(SYSTEM, 20, None)
    small.add(Turn("user", "", audio=heard))
    assert [m.role for m in small.messages()] == ["system"]


async def test_each_whole_window_of_speech_is_handed_on_while_the_user_still_speaks():
    from streaming_tokenizer.heard_speech import HeardSpeech

    windows: list[np.ndarray] = []
    arrived = asyncio.Condition()

    async def listen(window: np.ndarray) -> None:
        async with arrived:
            windows.append(window)
            arrived.notify_all()

    async def until(count: int) -> None:
        async with asyncio.timeout(5), arrived:
            await arrived.wait_for(lambda: len(windows) >= count)

    heard = HeardSpeech(None, listen, 25 * 16000)
    words = speech(52.0, 6)
    frames = words.reshape(-1, 320)  # 20 ms each
    heard.begin(tuple(frames[:10]))
    for frame in frames[10:]:
        heard.feed(frame, True)
    await until(2)
    assert [len(w) for w in windows] == [25 * 16000] * 2 and np.array_equal(np.concatenate(windows), words[: 50 * 16000])
    assert np.array_equal((await heard.finalize()).audio, words)  # the turn is still all of it
    heard.begin(tuple(frames[10:20]))  # the next utterance: its windows count from its own start
    for frame in frames[20 : 10 + 25 * 50]:
        heard.feed(frame, True)
    await until(3)
    assert len(windows) == 3 and np.array_equal(windows[2], words[320 * 10 : 320 * 10 + 25 * 16000])
    await heard.aclose()


def test_what_was_heard_of_the_ids_is_cut_where_playback_stopped():
    chunks = [((1, 2, 3, 4), 1000.0), ((5, 6), 1000.0)]
    assert heard_ids(chunks, 500) == (1, 2)
    assert heard_ids(chunks, 1500) == (1, 2, 3, 4, 5)
    assert heard_ids(chunks, 5000) == (1, 2, 3, 4, 5, 6)
    assert heard_ids(chunks, 0) == ()


# -- a taught tiny model ------------------------------------------------------------------------


def test_a_dialog_is_sent_to_a_server_as_stepfuns_client_sends_it():
    from models.stepaudio2_served import served_messages
    from testkit.stepaudio2_vllm import input_audio_samples

    asked, output = speech(31.0, 3), '{"time": "12:00"}'
    call = ToolCall("call_1", "current_time", "{}")
    messages = [
        Message("system", SYSTEM),
        Message("user", "", audio=asked),
        Message("assistant", "Hi.", ids=(72, 105, AUDIO_TOKEN_BASE + 7, AUDIO_TOKEN_BASE + 6561)),
        Message("assistant", "", (call,)),
        Message("tool", output, tool_call_id="call_1"),
        Message("user", "typed words"),
    ]
    sent = served_messages(messages)
    assert [m["role"] for m in sent] == ["system", "human", "assistant", "assistant", "input", "human", "assistant"]
    windows = sent[1]["content"]  # one wav per 25 s, as the reference's client cuts them
    assert [w["type"] for w in windows] == ["input_audio", "input_audio"] and {w["input_audio"]["format"] for w in windows} == {"wav"}
    heard = [input_audio_samples(w) for w in windows]
    assert [len(h) for h in heard] == [25 * 16000, 6 * 16000]
    assert np.abs(np.concatenate(heard) - asked).max() < 1e-4
    assert sent[2] == {"role": "assistant", "tts_content": {"tts_text": "Hi.", "tts_audio": "<audio_7>"}}  # padding is not speech
    assert sent[3] == {
        "role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "current_time", "arguments": "{}"}}]
    }
    assert sent[4] == {"role": "input", "tool_call_id": "call_1", "content": [{"type": "text", "text": output}]}
    assert sent[5] == {"role": "human", "content": "typed words"}
    assert sent[6] == {"role": "assistant", "content": "<tts_start>", "eot": False}  # the reply is to speak
    assert served_messages(messages[:2], speak=False)[-1]["role"] == "human"  # a transcription: the server opens the turn


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """Step-Audio-2-mini's layout: the model, `token2wav/` and the voice prompt, the model taught
    to speak SPOKEN when asked anything, to call current_time when it is offered, and to speak
    after the call's output."""
    import soundfile

    from testkit.stepaudio2_tiny import build_model_dir, build_token2wav_dir, teach

    root = build_model_dir(tmp_path_factory.mktemp("Step-Audio-2-mini"))
    build_token2wav_dir(root / "token2wav")
    soundfile.write(root / "default_female.wav", tone_speech(2.0, 24000, 5), 24000)
    chat = _chat(root)
    tokenizer = chat.tokenizer
    call = [tokenizer.convert_tokens_to_ids("<tool_call>"), *b"function\ncurrent_time\n{}", tokenizer.convert_tokens_to_ids("</tool_call>")]
    said, answer, eot = spoken_reply(SPOKEN, 1), spoken_reply("It is noon.", 2), [chat.eot]
    tools = builtin_tools()
    voices = _lesson_speech()

    def lessons(rng: np.random.Generator) -> list:
        """Asked anything: speak; offered functions: call one; after its output: speak of it.
        Each time with other speech: a voice cut to a random length, or tones."""
        voice = voices[rng.integers(len(voices))]
        heard = voice[: int(len(voice) * rng.uniform(0.4, 1.0))] if rng.random() < 0.6 else speech(rng.uniform(0.5, 4.0), int(rng.integers(1000)))
        start = [Message("system", SYSTEM), Message("user", "", audio=heard)]
        called = [*start, Message("assistant", "", (ToolCall("call_1", "current_time", "{}"),)), Message("tool", _time_output(int(rng.integers(30))), tool_call_id="call_1")]
        return [_lesson(chat, start, None, said + eot), _lesson(chat, start, tools, call + eot), _lesson(chat, called, tools, answer + eot)]

    try:
        assert teach(root, lessons) < 800
    finally:
        chat.worker.close()
    return root


def _lesson_speech() -> list[np.ndarray]:
    """What the lessons hear: voices and lengths other than the calls' questions."""
    from testkit.speech import espeak

    return [espeak(text, 16000, options) for text, options in (("Hello, can you hear me?", ()), ("Good morning, tell me the date and the hour.", ("-s", "200")))]


def _time_output(days: int) -> str:
    """current_time's output as the call gets it, on another day at another hour."""
    import datetime

    now = datetime.datetime.now().astimezone() + datetime.timedelta(days=days, hours=7 * days, minutes=13 * days)
    return json.dumps(
        {"iso": now.isoformat(timespec="seconds"), "time": now.strftime("%H:%M"), "date": now.strftime("%A, %d %B %Y"),
         "timezone": now.tzname() or "", "spoken": f"It's {now.strftime('%I:%M %p')} on {now.strftime('%A, %B')} {now.day}."},
        ensure_ascii=False,
    )


def _chat(root: Path):
    from models.stepaudio2_chat import StepAudio2Chat
    from models.stepaudio2_lm import Sampling, StepAudio2Model, load_tokenizer
    from runtime.workers import ModelWorker

    return StepAudio2Chat(StepAudio2Model.load(root), load_tokenizer(root), ModelWorker("lessons"), 400, Sampling(0.0, 1.0, 1.0))


def _lesson(chat, messages: list[Message], tools, reply: list[int]) -> tuple[list[int], list, list[int]]:
    prompt = chat.prompt(messages, tools)
    return prompt.ids, prompt.mels, reply


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from models.stepaudio2_lm import load_tokenizer
    from testkit.stepaudio2_tiny import build_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return load_tokenizer(directory)


async def test_the_taught_model_speaks_and_calls_as_taught(model_path):
    chat = _chat(model_path)
    asked = [Message("system", SYSTEM), Message("user", "", audio=speech(2.0, 99))]  # speech it was not taught on
    try:
        items = [item async for item in chat.stream(asked)]
        assert "".join(i for i in items if isinstance(i, str)) == SPOKEN
        assert [i for item in items if isinstance(item, ModelIds) for i in item.ids] == spoken_reply(SPOKEN, 1)
        items = [item async for item in chat.stream(asked, tools=builtin_tools())]
        assert items == [ToolCall("call_1", "current_time", "{}")]
    finally:
        chat.worker.close()


async def test_the_profile_says_what_is_missing_before_loading(tmp_path):
    from context.dialog import TranscriptStore
    from models.base import ModelSetupError
    from profiles import open_profile

    (tmp_path / "token2wav").mkdir()
    config = _config(tmp_path, tmp_path, tools=False)
    with pytest.raises(ModelSetupError, match="no config.json"):
        await open_profile(config, TranscriptStore(tmp_path / "data"))
    served = _config(tmp_path, tmp_path, tools=False, served="http://127.0.0.1:9/v1")  # the model is elsewhere
    with pytest.raises(ModelSetupError, match="assets/default_female.wav"):
        await open_profile(served, TranscriptStore(tmp_path / "data"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSetupError, match="assets/default_female.wav of StepFun's Step-Audio2 repository"):
        await open_profile(config, TranscriptStore(tmp_path / "data"))
    (tmp_path / "default_female.wav").write_bytes(b"RIFF, but not a wav")
    with pytest.raises(ModelSetupError, match="not a readable wav"):
        await open_profile(config, TranscriptStore(tmp_path / "data"))


# -- whole calls -------------------------------------------------------------------------------


def _config(model_path: Path, tmp_path: Path, tools: bool, served: str | None = None):
    from config import AppConfig, Interruption, ModelConfig, ServerConfig, StepAudio2Config, StepAudioConfig, TurnConfig

    return AppConfig(
        profile="stepaudio2",
        server=ServerConfig(data_dir=tmp_path / "data"),
        # Speech over the agent stops it at once: the tiny model's transcripts are no words, which
        # would be heard as a backchannel.
        turn=TurnConfig(interruption=Interruption(backchannel_max_ms=0)),
        models=ModelConfig(system_prompt=SYSTEM, builtin_tools=tools, **({"lm_url": served, "lm_model": "step-audio-2-mini"} if served else {})),
        stepaudio=StepAudioConfig(model_path=model_path),
        stepaudio2=StepAudio2Config(lm="served" if served else "local", device="cpu", temperature=0.0, max_new_tokens=400),
    )


@contextlib.asynccontextmanager
async def _served(lm: str, model_path: Path, tool_parser: bool = True):
    """For `served`: the stand-in for StepFun's vLLM on the taught weights, and its base URL."""
    if lm == "local":
        yield None, None
        return
    from aiohttp import web

    from testkit.local import free_port
    from testkit.stepaudio2_vllm import StepAudio2Vllm

    vllm = StepAudio2Vllm(_chat(model_path), tool_parser)
    runner = web.AppRunner(vllm.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield vllm, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        vllm.close()
        vllm.chat.worker.close()


def _replies(vllm) -> list[dict]:
    """Each request for a spoken reply the server got (not the transcriptions)."""
    return [request for request in vllm.requests if request["continue_final_message"]]


@contextlib.asynccontextmanager
async def _call_server(start_server, lm: str, model_path: Path, tmp_path: Path, tools: bool):
    """A server of the profile, the model in-process or served by the stand-in: the server, the
    stand-in (or None), and each prompt the profile's LM is asked to answer."""
    from context.dialog import TranscriptStore
    from profiles import open_profile

    async with _served(lm, model_path) as (vllm, url):
        profile = await open_profile(_config(model_path, tmp_path, tools, url), TranscriptStore(tmp_path / "data"))
        prompts: list[list[Message]] = []
        stream = profile.models.chat.stream

        def recording(messages, **options):
            prompts.append(messages)
            return stream(messages, **options)

        profile.models.chat.stream = recording
        try:
            yield await start_server(factory=profile.factory), vllm, prompts
        finally:
            await profile.aclose()


@pytest.mark.parametrize("lm", ["local", "served"])
async def test_a_webrtc_call_speculates_is_interrupted_and_keeps_the_heard_ids(start_server, model_path, tmp_path, lm):
    from testkit.peer import ClientPeer
    from testkit.speech import espeak
    from testkit.stepaudio2_vllm import input_audio_samples

    async with _call_server(start_server, lm, model_path, tmp_path, tools=False) as (server, vllm, prompts):
        peer = ClientPeer(server.url)
        session_id = await peer.connect()
        await peer.wait_event("session.created")
        peer.speak(espeak("What is the weather like today?", 48000), 48000)
        started = await peer.wait_event("response.audio.started", timeout=60)
        first = prompts[-1]
        assert [m.role for m in first] == ["system", "user"] and first[-1].audio is not None  # the model hears the speech
        assert len(first[-1].audio) > 16000  # the whole question, at 16 kHz
        # Over the agent, 2 s into its 7 s reply: it stops at once, and keeps what was heard.
        await peer.wait_audio(2.0, timeout=30, threshold=1e-4)
        peer.speak(espeak("Stop, tell me something else.", 48000), 48000)
        done = await peer.wait_event("response.done", timeout=30, predicate=lambda e: e["response"]["id"] == started["response_id"])
        assert done["response"]["status"] == "interrupted"
        metrics = await peer.wait_event("metrics.turn", timeout=5, predicate=lambda e: e["response_id"] == started["response_id"])
        assert metrics["speculative"]  # prepared at the first pause, committed at the turn's end
        # The next turn's prompt (the model was taught single turns: what it says to it is moot).
        await peer.wait_event("response.done", timeout=60, predicate=lambda e: e["response"]["id"] != started["response_id"])
        second = prompts[-1]
        assert [m.role for m in second] == ["system", "user", "assistant", "user"]
        user, heard = second[1], second[2]
        assert user.audio is not None and np.array_equal(user.audio, first[-1].audio)  # the first turn, as it was heard
        whole = spoken_reply(SPOKEN, 1)
        if vllm is not None:  # the server streams the audio ids; the text comes as text
            whole = [i for i in whole if i >= AUDIO_TOKEN_BASE]
        assert 0 < len(heard.ids) < len(whole) and list(heard.ids) == whole[: len(heard.ids)]  # the heard part only
        assert heard.content and SPOKEN.startswith(heard.content.strip()[:3])
        if vllm is not None:  # sent as StepFun's client sends a dialog: speech as wav, the reply's heard part
            sent = _replies(vllm)[-1]["messages"]
            assert [m["role"] for m in sent] == ["system", "human", "assistant", "human", "assistant"]
            assert np.abs(input_audio_samples(sent[1]["content"][0]) - user.audio).max() < 1e-4
            tts = sent[2]["tts_content"]
            assert tts["tts_text"] == heard.content
            assert tts["tts_audio"] == "".join(f"<audio_{i - AUDIO_TOKEN_BASE}>" for i in heard.ids)
            assert sent[-1] == {"role": "assistant", "content": "<tts_start>", "eot": False}
        session = server.registry.get(session_id)
        await peer.close()
        async with asyncio.timeout(20):
            await session.closed.wait()


@pytest.mark.parametrize("lm", ["local", "served"])
async def test_the_openai_sdk_hears_a_reply_made_with_a_function_call(start_server, model_path, tmp_path, lm):
    from tests.test_embedded import _speak_into, trimmed
    from tests.test_openai_realtime import client, strictly
    from testkit.speech import espeak

    async with _call_server(start_server, lm, model_path, tmp_path, tools=True) as (server, vllm, prompts):
        question = trimmed(espeak("What time is it?", 24000))
        async with client(server.url).realtime.connect(model="stepaudio2") as connection:
            events = []
            async with asyncio.timeout(120), asyncio.TaskGroup() as group:
                speaking = group.create_task(_speak_into(connection, question, 24000, then_silence_s=8.0))
                async for event in connection:
                    events.append(event)
                    strictly(event.model_dump(exclude_unset=True))
                    if event.type == "response.done":
                        speaking.cancel()
                        break
        kinds = [e.type for e in events]
        call = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert call.name == "current_time" and json.loads(call.arguments) == {}
        done = events[-1]
        assert done.response.status == "completed"
        said = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert said.strip() == "It is noon."  # what the model said after reading the call's output
        assert kinds.count("response.output_audio.delta") > 10
        follow_up = prompts[-1]
        assert [m.role for m in follow_up] == ["system", "user", "assistant", "tool"]
        assert follow_up[2].tool_calls[0].name == "current_time" and json.loads(follow_up[3].content)["iso"]
        if vllm is not None:  # the call and its output as the fork's client sends them
            sent = _replies(vllm)[-1]["messages"]
            assert [m["role"] for m in sent] == ["system", "human", "assistant", "input", "assistant"]
            (sent_call,) = sent[2]["tool_calls"]
            assert sent_call["function"] == {"name": "current_time", "arguments": "{}"}
            assert sent[3]["tool_call_id"] == sent_call["id"] == follow_up[2].tool_calls[0].id
            assert sent[3]["content"] == [{"type": "text", "text": follow_up[3].content}]
            assert _replies(vllm)[-1]["tools"] == builtin_tools()


async def test_a_server_started_without_a_tool_parser_is_asked_again_without_functions(model_path):
    """vLLM answers 400 to a request with tools unless started with a tool parser: the reply is
    asked for again without them, and none are offered from then on."""
    from models.stepaudio2_served import StepAudio2Served

    async with _served("served", model_path, tool_parser=False) as (vllm, url):
        lm = StepAudio2Served(url, "step-audio-2-mini", None, 400, 0.0)
        asked = [Message("system", SYSTEM), Message("user", "", audio=speech(2.0, 99))]
        try:
            items = [item async for item in lm.stream(asked, tools=builtin_tools())]
            assert "".join(i for i in items if isinstance(i, str)) == SPOKEN
            audio = [i for i in spoken_reply(SPOKEN, 1) if i >= AUDIO_TOKEN_BASE]
            assert [i for item in items if isinstance(item, ModelIds) for i in item.ids] == audio
            assert ["tools" in request for request in vllm.requests] == [True, False] and not lm.calls_tools
            assert [item async for item in lm.stream(asked, tools=builtin_tools())] == items
            assert "tools" not in vllm.requests[-1]
        finally:
            await lm.aclose()
