"""The stepaudio profile's real loaders and streaming code, on tiny random models in the real layout
(tests/stepaudio_tiny.py): tokenizer, Chat prompt and backends, TTS-3B prompt and voices, the
streaming decoder, and a whole call over WebRTC."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import subprocess
import sys

import numpy as np
import pytest

from models.base import Message
from models.stepaudio_chat import chat_prompt, served_chat, transcription_prompt, use_optimus_kernels
from models.stepaudio_tts import guard_repetition, leading_tags, music_mode, tts_prompt_ids
from runtime.workers import ModelWorker
from streaming_tokenizer.stepaudio import StepAudioStream, StepAudioTokenizer
from bench import stepaudio_tiny as tiny

pytestmark = pytest.mark.models


def test_the_embedded_path_imports_nothing_of_the_stepaudio_extra():
    code = (
        "import sys, run_server, profiles, profiles.embedded, streaming_tokenizer.whisper;"
        "bad = [m for m in ('funasr', 'cosyvoice', 'matcha', 'hyperpyyaml', 'profiles.stepaudio') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return tiny.build_model_path(tmp_path_factory.mktemp("stepaudio"))


@pytest.fixture(scope="module")
def tokenizer(model_path) -> StepAudioTokenizer:
    return StepAudioTokenizer(model_path / "Step-Audio-Tokenizer")


@pytest.fixture
def worker():
    w = ModelWorker("tokenizer-test", threads=2)
    yield w
    w.close()


# -- tokenizer -----------------------------------------------------------------------------------


def test_ten_seconds_give_the_documented_rates_and_the_2_3_pattern(tokenizer):
    codes = tokenizer.tokenize(tiny.tone_speech(10.0), 16000)
    assert len(codes.vq02) in (166, 167, 168)  # 16.7 Hz
    assert len(codes.vq06) == 250  # 25 Hz
    groups = min(len(codes.vq02) // 2, len(codes.vq06) // 3)
    ids = codes.ids()
    assert len(ids) == 5 * groups and abs(len(ids) / 10.0 - 41.6) < 0.5
    for g in range(groups):
        group = ids[5 * g : 5 * g + 5]
        assert all(65536 <= i < 65536 + 1024 for i in group[:2]), group
        assert all(65536 + 1024 <= i < 65536 + 1024 + 4096 for i in group[2:]), group
    text = codes.text()
    assert text == "".join(f"<audio_{i - 65536}>" for i in ids)
    assert text.startswith(f"<audio_{codes.vq02[0]}><audio_{codes.vq02[1]}><audio_{1024 + codes.vq06[0]}>")


def test_telephony_rate_input_is_upsampled(tokenizer):
    codes = tokenizer.tokenize(tiny.tone_speech(4.0, rate=8000), 8000)
    assert len(codes.vq06) == 100 and len(codes.vq02) in (66, 67, 68)


async def test_streaming_gives_the_offline_codes_and_finalize_only_computes_the_tail(tokenizer, worker):
    audio = tiny.tone_speech(10.0)
    offline = tokenizer.tokenize(audio, 16000)
    seen: list[int] = []
    original = tokenizer.semantic_codes

    def recording(piece):
        seen.append(len(piece))
        return original(piece)

    stream = StepAudioStream(tokenizer, worker, window_s=4.8)
    tokenizer.semantic_codes = recording
    try:
        pcm = (audio / np.abs(audio).max() * 0.999 * 32767).astype(np.int16)
        stream.begin(tuple(pcm[i : i + 320] for i in range(0, 3200, 320)))
        for i in range(3200, len(pcm), 320):
            stream.feed(pcm[i : i + 320], True)
        await stream.drained()
        before = len(seen)
        result = await stream.finalize()
    finally:
        tokenizer.semantic_codes = original
        await stream.aclose()
    assert seen[:before] == [4.8 * 16000, 4.8 * 16000]  # both whole windows ran while "speaking"
    assert seen[before:] == [len(audio) - 2 * 4.8 * 16000]  # finalize: only the 0.4 s tail
    streamed = result.lm_content
    assert streamed is not None
    # vq02 equals the offline codes exactly; vq06 windows see less context than one 10 s pass.
    assert streamed[: len(streamed) // 2].count("<audio_") > 100
    vq02 = [int(t) for t in streamed.replace(">", "").split("<audio_")[1:]]
    assert [c for i, c in enumerate(vq02) if i % 5 < 2] == [c for i, c in enumerate(offline.ids()) if i % 5 < 2 for c in [c - 65536]]


async def test_a_second_finalize_after_more_speech_covers_all_of_it(tokenizer, worker):
    audio = (tiny.tone_speech(3.0) * 32767).astype(np.int16)
    stream = StepAudioStream(tokenizer, worker)
    try:
        stream.begin(())
        for i in range(0, 16000, 320):
            stream.feed(audio[i : i + 320], True)
        first = await stream.finalize()
        for i in range(16000, len(audio), 320):
            stream.feed(audio[i : i + 320], True)
        second = await stream.finalize()
    finally:
        await stream.aclose()
    assert first.lm_content.count("<audio_") == 5 * 8  # 1 s: 8 whole groups of 120 ms
    assert second.lm_content.count("<audio_") == 5 * 25  # 3 s
    assert second.lm_content.startswith(first.lm_content[: first.lm_content.rfind("<audio_", 0, 200)])


async def test_sessions_stream_independently(tokenizer, worker):
    a, b = (tiny.tone_speech(2.0, seed=s) for s in (1, 2))
    alone = [tokenizer.tokenize(x, 16000).text() for x in (a, b)]
    streams = [StepAudioStream(tokenizer, worker), StepAudioStream(tokenizer, worker)]
    try:
        for s in streams:
            s.begin(())
        for i in range(0, len(a), 320):  # interleaved, as two calls at once would be
            for s, x in zip(streams, (a, b)):
                s.feed((x[i : i + 320] / np.abs(x).max() * 0.999 * 32767).astype(np.int16), True)
        together = await asyncio.gather(*(s.finalize() for s in streams))
    finally:
        for s in streams:
            await s.aclose()
    assert [t.lm_content[:300] for t in together] == [t[:300] for t in alone]


# -- Chat ----------------------------------------------------------------------------------------


def test_chat_prompt_is_byte_exact():
    messages = [
        Message("system", "Be brief."),
        Message("user", "hello"),
        Message("assistant", "Hi!"),
        Message("user", "<audio_5><audio_1030>"),
    ]
    assert chat_prompt(messages) == (
        "<|BOT|>system\nBe brief.<|EOT|>"
        "<|BOT|>human\nhello<|EOT|>"
        "<|BOT|>assistant\nHi!<|EOT|>"
        "<|BOT|>human\n<audio_5><audio_1030><|EOT|>"
        "<|BOT|>assistant\n"
    )
    # No system message: the default one. Tools: their schemas right after it.
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert chat_prompt([Message("user", "x")], tools=[tool]) == (
        "<|BOT|>system\nYou are a helpful assistant.<|EOT|>"
        '<|BOT|>tool_json_schemas\n[{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]<|EOT|>'
        "<|BOT|>human\nx<|EOT|>"
        "<|BOT|>assistant\n"
    )
    assert chat_prompt(transcription_prompt("<audio_1>")) == (
        "<|BOT|>system\n请记录下你所听到的语音内容。<|EOT|><|BOT|>human\n<audio_1><|EOT|><|BOT|>assistant\n"
    )


async def test_local_chat_loads_the_remote_code_model_and_streams(model_path, monkeypatch):
    from models.stepaudio_chat import local_chat

    chat_dir = model_path / "Step-Audio-Chat"
    monkeypatch.delenv("OPTIMUS_LIB_PATH", raising=False)
    (chat_dir / "lib").mkdir(exist_ok=True)
    worker = ModelWorker("chat-test")
    try:
        lm = await worker.run(local_chat, chat_dir, worker, 12, 0.0, 2)
        assert os.environ["OPTIMUS_LIB_PATH"] == str(chat_dir / "lib")
        assert type(lm._model).__name__ == "Step1ForCausalLM"
        assert str(lm._model.dtype) == "torch.bfloat16"
        ids = lm._tokenizer(chat_prompt([Message("user", "<audio_7>")]))["input_ids"]
        assert ids[:3] == [1, 4, *tiny.text_ids("s")] and 65536 + 7 in ids
        deltas = [d async for d in lm.stream([Message("user", "<audio_7><audio_1031>")])]
        assert deltas and all(isinstance(d, str) for d in deltas)
    finally:
        worker.close()
    monkeypatch.setenv("OPTIMUS_LIB_PATH", "/opt/kernels")
    assert use_optimus_kernels(chat_dir) == Path("/opt/kernels")


async def test_served_chat_sends_the_built_prompt_to_completions(completions_server):
    url, requests = await completions_server(["你", "好", "！"])
    lm = served_chat(url, "step-audio-chat", "k", 64, 0.7)
    try:
        messages = [Message("system", "S"), Message("user", "<audio_3>")]
        reply = "".join([d async for d in lm.stream(messages)])
    finally:
        await lm.aclose()
    assert reply == "你好！"
    body = requests[0]
    assert body["prompt"] == chat_prompt(messages) and "messages" not in body
    assert body["model"] == "step-audio-chat" and body["stream"] is True and body["top_p"] == 0.9


async def test_the_turn_transcript_comes_from_the_asr_prompt_with_room_for_the_speech(completions_server):
    from models.stepaudio_chat import transcribe

    url, requests = await completions_server(["今天", "天气", "很好。"])
    lm = served_chat(url, "step-audio-chat", None, 8, 0.7)  # a reply limit far too small for ASR
    try:
        text = await transcribe(lm, "<audio_1>" * 416)  # 10 s of speech
    finally:
        await lm.aclose()
    assert text == "今天天气很好。"
    assert requests[0]["prompt"] == chat_prompt(transcription_prompt("<audio_1>" * 416))
    assert requests[0]["max_tokens"] == 16 + 80


@pytest.fixture
async def completions_server():
    from aiohttp import web

    runners: list[web.AppRunner] = []

    async def start(pieces: list[str]):
        requests: list[dict] = []

        async def handle(request: web.Request) -> web.StreamResponse:
            requests.append(await request.json())
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for piece in pieces:
                event = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": piece}]}
                await response.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1", requests

    yield start
    for runner in runners:
        await runner.cleanup()


# -- TTS-3B --------------------------------------------------------------------------------------


def test_tts_prompt_ids_are_exact():
    ids = tts_prompt_ids(tiny.text_ids, "SYS", "ref", [65537, 66561], "hi")
    t = tiny.text_ids
    assert ids == (
        [1]
        + [4] + t("system\nSYS") + [3]
        + [4] + t("human\nref") + [3]
        + [4] + t("assistant\n") + [65537, 66561] + [3]
        + [4] + t("human\nhi") + [3]
        + [4] + t("assistant\n")
    )


def test_instruction_tags():
    assert leading_tags("(高兴1)今天天气真好") == ["高兴1"]
    assert leading_tags("（四川话）（快速1）要得") == ["四川话", "快速1"]
    assert leading_tags("(RAP)(高兴2) yo") == ["RAP", "高兴2"]
    assert leading_tags("（哼唱 慢速1）啦啦") == ["哼唱", "慢速1"]
    assert leading_tags("no tags (here)") == []
    assert music_mode(["RAP", "高兴2"]) == "RAP" and music_mode(["高兴2", "RAP"]) is None


def test_repetition_guard_bans_a_token_repeated_in_the_last_ten():
    import torch

    scores = torch.zeros(1, 10)
    guard_repetition([1, 2, 3, 4], scores)
    assert torch.isfinite(scores).all()
    guard_repetition([7, 1, 2, 7], scores)
    assert scores[0, 7] == float("-inf") and torch.isfinite(scores[0, :7]).all()
    scores = torch.zeros(1, 10)
    guard_repetition([7] + [1, 2, 3, 4, 5, 6, 8, 9, 0] + [7], scores)  # the first 7 is 10 back: out
    assert torch.isfinite(scores).all()


@pytest.fixture(scope="module")
def tts(model_path, tokenizer):
    from models.stepaudio_tts import StepAudioTTS

    lm_worker, decoder_worker = ModelWorker("tts-lm-test"), ModelWorker("tts-decoder-test")
    yield StepAudioTTS(model_path / "Step-Audio-TTS-3B", tokenizer.audio_ids, lm_worker, decoder_worker, max_seconds_per_char=0.1)
    lm_worker.close()
    decoder_worker.close()


def test_speakers_are_read_relative_to_the_model_directory(tts, model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clone = tts.registry_voice("Tingting")
    assert clone == {
        "speaker": "Tingting",
        "prompt_text": "你好，我是婷婷。",
        "wav_path": str(model_path / "Step-Audio-TTS-3B" / "speakers" / "Tingting_prompt.wav"),
    }
    assert tts.registry_voice("Tingting", "RAP")["speaker"] == "TingtingRAP"
    assert tts.registry_voice("Tingting", "哼唱")["wav_path"].endswith("Tingting哼唱_prompt.wav")
    with pytest.raises(KeyError):
        tts.registry_voice("Nobody")


def test_a_clone_voice_is_computed_once(tts, tokenizer, model_path):
    wav = model_path / "Step-Audio-TTS-3B" / "speakers" / "TingtingRAP_prompt.wav"
    clone = {"speaker": "guest", "prompt_text": "来一段说唱。", "wav_path": str(wav)}
    calls = []
    original = tokenizer.tokenize
    tokenizer.tokenize = lambda *a: calls.append(1) or original(*a)
    try:
        first, again = tts.voice(clone), tts.voice(dict(clone))
    finally:
        tokenizer.tokenize = original
    assert first is again and len(calls) == 1
    assert len(first.audio_ids) == 5 * 16  # 2 s of prompt: 16 groups
    prompt = tts.prompt_ids(first, "你好")
    audio_at = prompt.index(first.audio_ids[0])
    assert prompt[audio_at : audio_at + len(first.audio_ids)] == list(first.audio_ids)


async def test_generation_streams_audio_ids_only(tts):
    voice = await tts.decoder_worker.run(tts.voice, tts.registry_voice("Tingting"))
    tokens = [t async for t in tts.tokens(tts.prompt_ids(voice, "hi"), 60)]
    assert len(tokens) <= 60 and tokens and all(65536 <= t < 65536 + 5120 for t in tokens)


async def test_music_tags_switch_voice_and_decoder(tts):
    used = []
    original = tts.voice
    tts.voice = lambda clone, music=False: used.append((clone["speaker"], music)) or original(clone, music)
    try:
        chunks = [c async for c in tts.speak("(RAP)yo", ["RAP"])]
    finally:
        tts.voice = original
    assert used == [("TingtingRAP", True)] and chunks


# -- streaming decoder ---------------------------------------------------------------------------


def test_streaming_decoder_starts_after_the_first_chunk_and_has_no_seams(tts):
    import torch

    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting"))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 5120, 400).tolist()  # 9.6 s of speech tokens

    torch.manual_seed(0)  # the flow samples noise: the same draw on every run
    stream = decoder.stream(voice.condition)
    first = stream.push(tokens[:45])  # 0.6 s of tokens + 20 of look-ahead: the first chunk
    # 0.6 s of audio, less the vocoder's 20 frames held back to cross-fade with the next chunk.
    assert len(first) == 1 and abs(len(first[0]) - (decoder.mel_frames(25) - 20) * 256) <= 256
    pieces = first + stream.push(tokens[45:]) + [stream.finish()]
    streamed = np.concatenate(pieces)
    offline = decoder.decode_offline(voice.condition, tokens)
    # Same duration as the one-pass decode (each chunk's mel length is rounded down to a frame).
    assert abs(len(streamed) - len(offline)) <= 256 * len(pieces)
    assert len(pieces) >= 6  # 0.6 s, 1 s, then 2 s chunks

    # No discontinuity at the seams: the level just after each seam continues the level just
    # before it. (Without the cross-fades, the vocoder's restart shows here as a dip to about 0.8.)
    for seam in np.cumsum([len(p) for p in pieces[:-1]]):
        before, after = streamed[seam - 256 : seam], streamed[seam : seam + 256]
        ratio = float(np.sqrt(np.mean(after**2)) / max(np.sqrt(np.mean(before**2)), 1e-9))
        assert 0.9 < ratio < 1.25, (seam, ratio)


def test_the_decoder_loads_first_in_a_fresh_process(model_path):
    """cosyvoice needs a stand-in for torchaudio here; loading the decoder before anything else
    (transformers included) must still work."""
    code = (
        "import sys; from pathlib import Path; from models.cosyvoice_decoder import CosyVoiceDecoder;"
        f"d = CosyVoiceDecoder(Path({str(model_path / 'Step-Audio-TTS-3B' / 'CosyVoice-300M-25Hz')!r}));"
        "print(d.token_rate)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and "41.66" in result.stdout, result.stderr[-2000:]


def test_streamed_vocoder_equals_the_offline_vocoder_away_from_the_seams(tts):
    """The vocoder stage (mel cache, source cache, held-back tail, cross-fade) on a long mel, in the
    decoder's chunk sizes: equal to one vocoder pass over the whole mel except where each chunk's
    head is cross-faded with the previous chunk's tail."""
    import torch

    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting"))
    mel = torch.from_numpy(np.random.default_rng(5).standard_normal((1, 80, 600)).astype(np.float32)) * 0.5 - 4.0
    with torch.inference_mode():
        offline = decoder.hift.inference(speech_feat=mel)[0][0].numpy()
    stream = decoder.stream(voice.condition)
    pieces, start = [], 0
    for frames in (51, 86, 172, 172, 119):
        pieces.append(stream.vocode(mel[:, :, start : start + frames], final=start + frames == 600))
        start += frames
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(offline) == 600 * 256
    faded = np.zeros(len(streamed), dtype=bool)
    for seam in np.cumsum([len(p) for p in pieces[:-1]]):
        faded[seam : seam + 20 * 256] = True  # 20 frames of cross-fade after each seam
    scale = np.abs(offline).max()
    assert np.abs(streamed - offline)[~faded].max() < 1e-4 * scale
    # Where a chunk restarts, the vocoder's edge differs from the one pass: what the fade is for.
    assert np.abs(streamed - offline)[faded].max() > 1e-3 * scale


def test_streamed_mel_follows_the_offline_mel_away_from_the_seams(tts, monkeypatch):
    """With the flow's sampling noise taken out (zeros for torch.randn_like), what is left to differ
    is the streaming itself: chunk boundaries, look-ahead, caches, cross-fades, and each chunk's
    own context (the flow's encoder attends within a chunk; its length regulator stretches each
    chunk's middle separately). Measured on per-bin deviations, away from the seams, the streamed
    mel must follow the one-pass mel frame for frame: on these tiny random weights it correlates
    about 0.6 aligned, about 0 when shifted by two frames (one token)."""
    import torch

    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: torch.zeros_like(x))
    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting"))
    tokens = np.random.default_rng(4).integers(0, 5120, 300).tolist()

    offline = decoder.stream(voice.condition).flow(tokens, final=True)[0].numpy()
    stream = decoder.stream(voice.condition)
    mels: list[np.ndarray] = []
    original = stream.flow

    def recording(chunk, final):
        mel = original(chunk, final)
        mels.append(mel[0].numpy())
        return mel

    stream.flow = recording
    stream.push(tokens)
    stream.finish()
    streamed = np.concatenate(mels, axis=1)
    assert abs(streamed.shape[1] - offline.shape[1]) <= len(mels)
    seams = np.cumsum([m.shape[1] for m in mels[:-1]])
    frames = min(streamed.shape[1], offline.shape[1])

    def follows(shift: int) -> float:
        a, b = streamed[:, shift:frames], offline[:, : frames - shift]
        inner = np.ones(a.shape[1], dtype=bool)
        for seam in seams:
            inner[max(0, seam - 45) : seam + 45] = False  # the cross-faded look-ahead on each side
        a, b = a[:, inner], b[:, inner]
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    aligned, shifted = follows(0), follows(2)
    assert aligned > 0.45 and shifted < aligned - 0.3, (aligned, shifted)


# -- a whole call --------------------------------------------------------------------------------


async def test_a_call_runs_through_the_controller_and_hanging_up_frees_everything(start_server, model_path, tmp_path):
    from bench.peer import ClientPeer
    from config import AppConfig, ModelConfig, ServerConfig, StepAudioConfig
    from context.dialog import TranscriptStore
    from profiles import open_profile
    from bench.speech import espeak

    question = espeak("What is the weather like today?", 48000)
    config = AppConfig(
        profile="stepaudio",
        server=ServerConfig(data_dir=tmp_path / "data"),
        models=ModelConfig(max_new_tokens=24),
        stepaudio=StepAudioConfig(model_path=model_path, device="cpu"),
    )
    profile = await open_profile(config, TranscriptStore(tmp_path / "data"))
    models = profile.models
    try:
        prompts: list[list[Message]] = []
        chat_stream = models.chat.stream

        def recording(messages, **options):
            prompts.append(messages)
            return chat_stream(messages, **options)

        models.chat.stream = recording
        generations: list[tuple[int, object]] = []  # (max tokens, stop flag) of each TTS generation
        generate_now = models.tts.generate_now

        def tracked(prompt, max_tokens, post, stop):
            generations.append((max_tokens, stop))
            return generate_now(prompt, max_tokens, post, stop)

        models.tts.generate_now = tracked
        server = await start_server(factory=profile.factory)
        peer = ClientPeer(server.url)
        session_id = await peer.connect()
        await peer.wait_event("session.created")
        session = server.registry.get(session_id)
        peer.speak(question, 48000)

        completed = await peer.wait_event("conversation.item.input_audio_transcription.completed", timeout=60)
        assert completed["transcript"].strip()  # the Chat model's transcript (random here)
        started = await peer.wait_event("response.audio.started", timeout=60)
        await peer.wait_audio(1.0, timeout=60)  # the agent's voice, at 22,050 Hz resampled for WebRTC
        assert any(e["type"] == "response.text.delta" for e in peer.events)
        # The LM read this turn as Step-Audio audio tokens; the transcript came from the ASR prompt.
        asr = [p for p in prompts if p[0].content == "请记录下你所听到的语音内容。"]
        replies = [p for p in prompts if p not in asr]
        assert asr and asr[0][-1].content.startswith("<audio_")
        assert replies and replies[-1][-1].role == "user" and replies[-1][-1].content.startswith("<audio_")
        assert [m.role for m in replies[-1]] == ["system", "user"]  # this turn once, as audio
        assert replies[-1][-1].content == asr[-1][-1].content

        # Hang up while the agent speaks: the session and every model worker are freed at once.
        assert started and not any(e["type"] == "response.done" for e in peer.events)
        await peer.close()
        async with asyncio.timeout(20):
            await session.closed.wait()
        assert len(server.registry) == 0
        assert generations and generations[-1][1].is_set()  # the TTS LM was told to stop
        for worker in models.workers:
            done = asyncio.wrap_future(worker.submit(lambda: None))
            async with asyncio.timeout(5):  # queued behind whatever still runs: frees within a step
                await done
        assert all(worker.busy == 0 for worker in models.workers)
    finally:
        await profile.aclose()


def test_voice_file_and_system_prompts_from_configuration(tts, model_path, tmp_path):
    from models.base import ModelSetupError
    from profiles.stepaudio import read_clone, read_tts_prompts

    wav = model_path / "Step-Audio-TTS-3B" / "speakers" / "Tingting_prompt.wav"
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "me.wav").write_bytes(wav.read_bytes())
    voice_file = tmp_path / "voices" / "me.json"
    voice_file.write_text(json.dumps({"speaker": "me", "prompt_text": "你好。", "wav_path": "me.wav"}))
    assert read_clone(voice_file) == {"speaker": "me", "prompt_text": "你好。", "wav_path": str(tmp_path / "voices" / "me.wav")}
    voice_file.write_text(json.dumps({"speaker": "me", "wav_path": "me.wav"}))
    with pytest.raises(ModelSetupError, match="prompt_text"):
        read_clone(voice_file)
    voice_file.write_text("not json")
    with pytest.raises(ModelSetupError, match="not a JSON object"):
        read_clone(voice_file)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps({"without_speaker": "A", "with_speaker": "B {speaker}"}))
    assert read_tts_prompts(prompts_file) == ("A", "B {speaker}")

    voice = tts.voice({"speaker": "me", "prompt_text": "你好。", "wav_path": str(tmp_path / "voices" / "me.wav")})
    saved = tts.system_prompts
    tts.system_prompts = read_tts_prompts(prompts_file)
    try:
        ids = tts.prompt_ids(voice, "x")
        assert ids[:2 + len(tiny.text_ids("system\nB me"))] == [1, 4, *tiny.text_ids("system\nB me")]
        assert tts.prompt_ids(voice, "x", with_speaker=False)[:3 + 8] == [1, 4, *tiny.text_ids("system\nA"), 3]
    finally:
        tts.system_prompts = saved


async def test_a_cloned_voice_speaks_plain_text_and_music_keeps_the_registry(tts, model_path):
    clone = tts.registry_voice("Tingting") | {"speaker": "guest"}
    used = []
    original = tts.voice
    tts.voice = lambda c, music=False: used.append(c["speaker"]) or original(c, music)
    tts.clone = clone
    try:
        assert [c async for c in tts.speak("hi", [])]
        assert [c async for c in tts.speak("(RAP)yo", ["RAP"])]
    finally:
        tts.voice, tts.clone = original, None
    assert used == ["guest", "TingtingRAP"]


def test_the_speaker_registry_reads_utf8_with_bom_and_gbk(tmp_path):
    from models.stepaudio_tts import read_speakers

    info = {"Tingting": "你好，我是婷婷。"}
    for encoding in ("utf-8", "utf-8-sig", "gbk"):
        path = tmp_path / f"{encoding}.json"
        path.write_bytes(json.dumps(info, ensure_ascii=False).encode(encoding))
        assert read_speakers(path) == info
