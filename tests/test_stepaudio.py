"""The stepaudio profile's real loaders and streaming code, on tiny random models in the real layout
(testkit/stepaudio_tiny.py): tokenizer, Chat prompt and backends, TTS-3B prompt and voices, the
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
from models.stepaudio_tts import SystemPrompts, guard_repetition, instruction, music_mode, tag_prefix
from runtime.workers import ModelWorker
from streaming_tokenizer.stepaudio import StepAudioStream, StepAudioTokenizer
from testkit import stepaudio_tiny as tiny

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


def windowed_sinc_sample(audio: np.ndarray, rate: int, to_rate: int, m: int) -> float:
    """Output sample `m` of the reference's resampler by its formula, summed over every input
    sample in float64: the input band-limited at 0.99 of the lower Nyquist frequency by a sinc
    tapered with a Hann window to 6 zero crossings either side."""
    cutoff = min(rate, to_rate) * 0.99
    t = np.clip((np.arange(len(audio)) / rate - m / to_rate) * cutoff, -6, 6)
    sinc = np.sinc(t)  # sin(pi t) / (pi t)
    return float(np.sum(audio.astype(np.float64) * sinc * np.cos(np.pi * t / 12) ** 2) * cutoff / rate)


@pytest.mark.parametrize("rate, to_rate", [(22050, 16000), (24000, 16000), (48000, 22050), (8000, 16000)])
def test_prompts_are_resampled_by_the_references_windowed_sinc(rate, to_rate):
    """Voice prompts reach 16 kHz (tokens, x-vector) and 22,050 Hz (mel) as torchaudio's `Resample`
    takes them there (soxr's filter changed 2-3 of a prompt's ~95 vq02 codes)."""
    from runtime.sinc_resample import resample

    audio = (np.random.default_rng(rate).standard_normal(rate // 2) * 0.3).astype(np.float32)
    out = resample(audio, rate, to_rate)
    assert len(out) == -(-len(audio) * to_rate // rate)
    for m in [0, 1, 7, len(out) // 3, len(out) // 2 + 1, len(out) - 2, len(out) - 1]:
        assert out[m] == pytest.approx(windowed_sinc_sample(audio, rate, to_rate, m), abs=2e-5), m


def kaldi_fbank(audio: np.ndarray) -> np.ndarray:
    """Kaldi's 80-bin fbank of 16 kHz [-1, 1] audio with the reference's options (no dither), from
    its definition: 25 ms frames every 10 ms, DC removed, pre-emphasis 0.97, Povey window, 512-point
    power spectrum, triangles even on the mel scale from 20 Hz to 8 kHz, log floored at float32's
    epsilon."""
    frames = np.stack([audio[i : i + 400] for i in range(0, len(audio) - 399, 160)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] *= 1 - 0.97
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    edges = np.linspace(mel(20), mel(8000), 82)
    bins = mel(np.arange(256) * 16000 / 512)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    weights = np.clip(np.minimum((bins - left) / (centre - left), (right - bins) / (right - centre)), 0, None)
    return np.log(np.maximum(power[:, :256] @ weights.T, np.finfo(np.float32).eps))


def test_the_xvector_reads_the_prompt_as_the_reference_does():
    """CAM++'s features: Kaldi's fbank of the [-1, 1] samples, mean-normalized. A prompt with
    digital silence in it floors those frames' log energies, so the samples' scale shows."""
    from models.cosyvoice_decoder import xvector_features

    audio = (np.random.default_rng(0).standard_normal(32000) * 0.1).astype(np.float32)
    audio[8000:16000] = 0
    expected = kaldi_fbank(audio)
    expected -= expected.mean(axis=0)
    assert np.abs(xvector_features(audio) - expected).max() < 2e-3


def reference_vq02(tokenizer, audio: np.ndarray) -> list[int]:
    """The reference's vq02 rule, stated on its own: the normalized clip is cut into 240 ms chunks
    (the last, partial one marked final and dropped when under 480 samples gives no fbank); each
    chunk's encoder output covers [5 cached frames, the chunk's n new frames], and the chunk's codes
    are those of its last n frames, the nearest centroid of each."""
    import torch
    from funasr.utils.load_utils import extract_fbank

    cache = tokenizer._new_cache()
    chunks = [audio[i : i + 3840] for i in range(0, len(audio), 3840)]
    if len(audio) % 3840 == 0:
        chunks.append(audio[:0])
    frames = []
    with torch.inference_mode():
        for i, chunk in enumerate(chunks):
            final = i == len(chunks) - 1
            if final and len(chunk) < 480:
                break
            speech, lengths = extract_fbank([torch.from_numpy(chunk)], frontend=tokenizer.frontend, cache=cache["frontend"], is_final=final)
            encoded, _ = tokenizer.paraformer.encode_chunk(speech, lengths, cache=cache, is_final=final)
            assert encoded.shape[1] == 5 + speech.shape[1]
            frames.append(encoded[0, encoded.shape[1] - speech.shape[1] :])
    return torch.cdist(torch.cat(frames), tokenizer.centroids).argmin(dim=1).tolist()


def reference_codes(tokenizer, pcm: np.ndarray):
    """The reference's offline codes of an utterance: normalized by its own peak, vq02 by the rule
    above, vq06 over the whole utterance in one window."""
    from streaming_tokenizer.stepaudio import DualCodes

    audio = pcm.astype(np.float32) / 32768.0
    audio = audio / max(float(np.abs(audio).max()), 0.01) * 0.999
    return DualCodes(tuple(reference_vq02(tokenizer, audio)), tuple(tokenizer.semantic_codes(audio)))


def codes_of(text: str) -> tuple[list[int], list[int]]:
    ns = [int(t) for t in text.replace(">", "").split("<audio_")[1:]]
    return [n for i, n in enumerate(ns) if i % 5 < 2], [n - 1024 for i, n in enumerate(ns) if i % 5 >= 2]


def test_vq02_follows_the_reference_frame_selection_with_no_look_ahead(tokenizer):
    audio = tiny.tone_speech(3.4)
    audio = audio / np.abs(audio).max() * 0.999
    assert tokenizer.linguistic_stream().flush(audio) == reference_vq02(tokenizer, audio)
    # Each chunk's codes come with the chunk: 4 after the first 240 ms, none waits for more audio.
    stream = tokenizer.linguistic_stream()
    assert stream.push(audio[:3840]) == reference_vq02(tokenizer, audio[:3840 * 3])[:4]
    # A clip that ends on a chunk boundary gives what its whole chunks gave.
    assert tokenizer.linguistic_stream().flush(audio[: 3840 * 5]) == tokenizer.linguistic_stream().push(audio[: 3840 * 5])


def test_voice_prompts_are_trimmed_of_silence_as_the_reference_does(tokenizer):
    from streaming_tokenizer.stepaudio import trim_silence

    speech = tiny.tone_speech(1.0)
    padded = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)])
    trimmed = trim_silence(padded)
    # 50 ms kept before the sound, 220 ms after it, the sound rounded up to 15 ms steps.
    assert abs(len(trimmed) - (16000 + 800 + 3520)) <= 240 + 512
    assert np.abs(trimmed[:700]).max() == 0 and np.abs(trimmed[900:1100]).max() > 0.05
    assert len(tokenizer.tokenize(padded, 16000, trim=True).ids()) < len(tokenizer.tokenize(padded, 16000).ids())


async def stream_live(tokenizer, worker, pcm: np.ndarray):
    """An utterance as a live call gives it: 20 ms frames, the pump caught up every 240 ms; then
    the end of speech. Returns the utterance and how often its codes started over."""
    stream = StepAudioStream(tokenizer, worker)
    try:
        stream.begin(tuple(pcm[i : i + 320] for i in range(0, 3200, 320)))
        for i in range(3200, len(pcm), 320):
            stream.feed(pcm[i : i + 320], True)
            if (i // 320) % 12 == 0:
                await stream.drained()
        return await stream.finalize(), stream.restarts
    finally:
        await stream.aclose()


async def test_streamed_codes_equal_the_reference_offline_codes_on_a_clip_with_a_loud_ending(tokenizer, worker):
    audio = tiny.tone_speech(10.0)
    audio[-16000:] *= 2.5  # the last second is the loudest: the gain changes at the very end
    pcm = (audio / np.abs(audio).max() * 0.9 * 32767).astype(np.int16)
    reference = reference_codes(tokenizer, pcm)
    result, restarts = await stream_live(tokenizer, worker, pcm)
    assert result.lm_content == reference.text()
    assert restarts >= 1  # the loud ending made the codes so far stale

    # What the test tells apart: the gain of the first 9 s alone, and vq06 in 4.8 s windows, each
    # give other codes on these weights.
    early = pcm[:-16000].astype(np.float32) / 32768.0
    quiet = (pcm.astype(np.float32) / 32768.0) / np.abs(early).max() * 0.999
    assert tokenizer.linguistic_stream().flush(quiet) != list(reference.vq02)
    normalized = (pcm.astype(np.float32) / 32768.0) / (np.abs(pcm).max() / 32768.0) * 0.999
    windows = [c for i in range(0, len(normalized), 76800) for c in tokenizer.semantic_codes(normalized[i : i + 76800])]
    assert windows != list(reference.vq06)


async def test_a_steady_clip_streams_without_starting_over(tokenizer, worker):
    audio = tiny.tone_speech(6.0)
    audio[:1600] *= 2.0  # the peak comes first, as a plosive often does
    pcm = (audio / np.abs(audio).max() * 0.9 * 32767).astype(np.int16)
    result, restarts = await stream_live(tokenizer, worker, pcm)
    assert restarts == 0 and result.lm_content == reference_codes(tokenizer, pcm).text()


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


def test_instruction_tags_as_the_reference_detects_them():
    assert instruction("(高兴1)今天天气真好") == "高兴1" and instruction("（四川话）（快速1）要得") == "四川话"
    assert music_mode("(RAP)(高兴2) yo") == "RAP" and music_mode("（哼唱）啦啦") == "哼唱"
    # Only one whole group at the very start switches to music.
    for text in ("（RAP 快速1）yo", "(哼唱 RAP)啦", " (RAP)yo", "(高兴2)(RAP) yo", "no tags (RAP)"):
        assert music_mode(text) is None, text
    assert tag_prefix("(高兴1)（四川话） 要得") == "(高兴1)（四川话）" and tag_prefix("要得(高兴1)") == ""


def test_repetition_guard_bans_a_token_repeated_in_the_last_ten_prompt_included():
    import torch

    scores = torch.zeros(1, 10)
    guard_repetition([7, 1, 2, 7], scores)  # fewer than ten tokens so far: the reference waits
    assert torch.isfinite(scores).all()
    guard_repetition([0, 1, 2, 3, 4, 5, 6, 8, 9, 1], scores)  # 1 twice in the last ten
    assert scores[0, 1] == float("-inf") and torch.isfinite(scores[0, 2:]).all()
    scores = torch.zeros(1, 10)
    guard_repetition([7] + [1, 2, 3, 4, 5, 6, 8, 9, 0] + [7], scores)  # the first 7 is 10 back: out
    assert torch.isfinite(scores).all()


PROMPTS = SystemPrompts(without_speaker="W", with_speaker="S[{speaker}]", rap="R", humming="H")


@pytest.fixture(scope="module")
def tts(model_path, tokenizer):
    from models.stepaudio_tts import StepAudioTTS

    lm_worker, decoder_worker = ModelWorker("tts-lm-test"), ModelWorker("tts-decoder-test")
    yield StepAudioTTS(
        model_path / "Step-Audio-TTS-3B", tokenizer.prompt_ids, lm_worker, decoder_worker, max_seconds_per_char=0.1, system_prompts=PROMPTS
    )
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
    tokenizer.tokenize = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        first, again = tts.voice(clone), tts.voice(dict(clone))
    finally:
        tokenizer.tokenize = original
    assert first is again and len(calls) == 1


async def test_generation_streams_audio_ids_only(tts):
    voice = await tts.decoder_worker.run(tts.voice, tts.registry_voice("Tingting"))
    tokens = [t async for t in tts.tokens(tts.prompt_ids(voice, "hi", "Tingting"), 60)]
    assert len(tokens) <= 60 and tokens and all(65536 <= t < 65536 + 5120 for t in tokens)


def speaker_prompt_ids(tts, tokenizer, clone: dict, system: str, text: str) -> list[int]:
    """The reference's TTS-3B prompt for one sentence, written out: each turn `[BOT, BOS, ...]`, the
    voice's audio tokens of its prompt wav trimmed of silence, `[EOT]` after each turn."""
    import soundfile

    t = tiny.text_ids
    audio, rate = soundfile.read(clone["wav_path"], dtype="float32")
    codes = tokenizer.tokenize(audio, rate, trim=True).ids()
    return (
        [1]
        + [4, 1, *t("system\n" + system), 3]
        + [4, 1, *t("human\n"), *t(clone["prompt_text"]), 3]
        + [4, 1, *t("assistant\n"), *codes, 3]
        + [4, 1, *t("human\n"), *t(text), 3]
        + [4, 1, *t("assistant\n")]
    )


@pytest.mark.parametrize(
    ("case", "text", "clone", "system", "voice", "decoder"),
    [
        ("plain", "你好", False, "S[Tingting]", "Tingting", None),
        ("emotion", "(高兴1)你好", False, "S[Tingting]", "Tingting", None),
        ("rap", "(RAP)你好", False, "R", "TingtingRAP", "music"),
        ("humming", "(哼唱)啦啦", False, "H", "Tingting哼唱", "music"),
        ("clone", "你好", True, "W", "guest", None),
        ("clone_rap", "(RAP)你好", True, "R", "guest", "music"),
    ],
)
async def test_tts_prompt_of_each_case_is_the_reference_layout(tts, tokenizer, model_path, case, text, clone, system, voice, decoder):
    wav = model_path / "Step-Audio-TTS-3B" / "speakers" / "Tingting_prompt.wav"
    guest = {"speaker": "guest", "prompt_text": "我是客人。", "wav_path": str(wav)}
    prompts, streams = [], []
    tokens, decoders = tts.tokens, {k: d.stream for k, d in tts.decoders.items()}

    def recording(prompt, max_tokens):
        prompts.append(prompt)
        return tokens(prompt, 1)

    tts.tokens = recording
    for key, d in tts.decoders.items():
        d.stream = lambda condition, key=key: streams.append(key) or decoders[key](condition)
    tts.clone = guest if clone else None
    try:
        assert [c async for c in tts.speak(text)] is not None
    finally:
        tts.tokens, tts.clone = tokens, None
        for key, d in tts.decoders.items():
            d.stream = decoders[key]
    entry = guest if clone else tts.registry_voice("Tingting", music_mode(text))
    assert entry["speaker"] == voice and streams == [decoder]
    assert prompts == [speaker_prompt_ids(tts, tokenizer, entry, system, text)]


async def test_later_sentences_of_a_reply_carry_the_tags_set_before_them(tts):
    from models.stepaudio_tts import tagged

    calls = []
    speak = tts.speak

    async def recording(text, tags=""):
        calls.append(tagged(text, tags))
        return
        yield

    async def reply():
        yield "(RAP 快速1)第一句话很长很长。"
        yield "第二句话也很长很长。(高兴1)第三句话很长很长。第四句话很长很长。"

    tts.speak = recording
    try:
        assert [c async for c in tts.synthesize(reply())] == []
    finally:
        tts.speak = speak
    assert calls == [
        "(RAP 快速1)第一句话很长很长。",
        "(RAP 快速1)第二句话也很长很长。",
        "(高兴1)第三句话很长很长。",
        "(高兴1)第四句话很长很长。",
    ]


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


def test_streamed_mel_follows_the_offline_mel_away_from_the_seams(tts):
    """Streamed and one-pass frames start from the same noise (the decoder's buffer, frame by
    frame), so what is left to differ is the streaming itself: chunk boundaries, look-ahead,
    cross-fades, each chunk's frames rounded on their own, and the flow's estimator attending over
    the prompt and one chunk rather than all frames. Measured on per-bin deviations, away from the
    seams, the streamed mel must follow the one-pass mel frame for frame: on these tiny random
    weights it correlates about 0.9 aligned, about 0 when shifted by two frames (one token); its
    relative L2 distance is about 0.43 (1.22 when each chunk drew its own noise)."""
    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting"))
    tokens = np.random.default_rng(4).integers(0, 5120, 300).tolist()

    offline = decoder.flow_mel(voice.condition, tokens, 0, split=False)[0][0].numpy()
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
    relative = np.linalg.norm(streamed[:, :frames] - offline[:, :frames]) / np.linalg.norm(offline[:, :frames])
    assert relative < 0.6, relative

    def follows(shift: int) -> float:
        a, b = streamed[:, shift:frames], offline[:, : frames - shift]
        inner = np.ones(a.shape[1], dtype=bool)
        for seam in seams:
            inner[max(0, seam - 45) : seam + 45] = False  # the cross-faded look-ahead on each side
        a, b = a[:, inner], b[:, inner]
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    aligned, shifted = follows(0), follows(2)
    assert aligned > 0.6 and shifted < aligned - 0.3, (aligned, shifted)


def test_one_pass_flow_is_the_reference_flow_with_its_length_regulator(tts, monkeypatch):
    """The reference's flow stretches all target tokens over their frames in one interpolation;
    cosyvoice-minicpmo's stretches the first and last 20 apart. Run the installed flow with the
    reference's rule put in and the same noise: the one-pass mel equals it; with minicpmo's own rule
    it does not."""
    import torch
    from torch.nn import functional as F

    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting")).condition
    tokens = np.random.default_rng(6).integers(0, 5120, 120).tolist()
    flow = decoder.flow

    def installed_flow() -> np.ndarray:
        monkeypatch.setattr(torch, "randn_like", lambda x, **kw: decoder.noise_at(0, x.shape[2]).to(x.dtype))
        with torch.inference_mode():
            mel, _ = flow.inference(
                token=torch.tensor([tokens], dtype=torch.int32),
                token_len=torch.tensor([len(tokens)], dtype=torch.int32),
                prompt_token=voice.tokens,
                prompt_token_len=torch.tensor([voice.tokens.shape[1]], dtype=torch.int32),
                prompt_feat=voice.mel,
                prompt_feat_len=torch.tensor([voice.mel.shape[1]], dtype=torch.int32),
                embedding=voice.embedding,
                flow_cache=torch.zeros(1, 80, 0, 2),
            )
        monkeypatch.undo()
        return mel[0].numpy()

    def reference_rule(x1, x2, mel_len1, mel_len2, input_frame_rate=50):
        x = torch.concat(
            [
                F.interpolate(x1.transpose(1, 2), size=mel_len1, mode="linear"),
                F.interpolate(x2.transpose(1, 2), size=mel_len2, mode="linear"),
            ],
            dim=2,
        )
        return flow.length_regulator.model(x).transpose(1, 2), mel_len1 + mel_len2

    ours = decoder.flow_mel(voice, tokens, 0, split=False)[0][0].numpy()
    minicpmo = installed_flow()
    regulator = flow.length_regulator.inference
    flow.length_regulator.inference = reference_rule
    try:
        reference = installed_flow()
    finally:
        flow.length_regulator.inference = regulator
    assert ours.shape == reference.shape and np.abs(ours - reference).max() < 1e-4
    assert np.abs(minicpmo - reference).max() > 1e-2


def test_streamed_frames_start_from_the_one_pass_noise_and_carry_the_whole_look_ahead(tts, monkeypatch):
    """Each chunk's frames start from the noise the one-pass decode gives the same frames, and the
    condition carried from a chunk to the next covers its 20 look-ahead tokens: 41 frames at
    41.67 tokens a second (cosyvoice-minicpmo's cache keeps 34, which is 20 tokens at 50 Hz)."""
    decoder = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting")).condition
    tokens = np.random.default_rng(8).integers(0, 5120, 200).tolist()
    prompt_frames = voice.mel.shape[1]
    starts: list[np.ndarray] = []
    solve = decoder.flow.decoder.solve_euler

    def recording(x, **kw):
        starts.append(x[0, :, prompt_frames:].float().numpy())
        return solve(x, **kw)

    monkeypatch.setattr(decoder.flow.decoder, "solve_euler", recording)
    decoder.flow_mel(voice, tokens, 0, split=False)
    stream = decoder.stream(voice)
    stream.push(tokens)
    assert stream._carried.shape[2] == decoder.mel_frames(20) == 41
    stream.finish()
    one_pass, chunks = starts[0], starts[1:]
    assert len(chunks) >= 4
    start = 0
    for noise in chunks:
        compared = min(noise.shape[1], one_pass.shape[1] - start)  # the last chunk may round up a frame
        assert compared > 0 and np.array_equal(noise[:, :compared], one_pass[:, start : start + compared])
        start += noise.shape[1] - 41  # all but the look-ahead, which the next chunk decodes again


def test_a_yaml_naming_the_vendored_mel_function_loads(model_path, tmp_path):
    """Step-Audio's CosyVoice yaml names its vendored `cosyvoice.matcha.audio.mel_spectrogram`;
    cosyvoice-minicpmo keeps the same function in matcha: the name is mapped, and the prompt mel
    is the same as with the installed name."""
    import shutil

    import torch
    from models.cosyvoice_decoder import CosyVoiceDecoder

    source = model_path / "Step-Audio-TTS-3B" / "CosyVoice-300M-25Hz"
    vendored = tmp_path / "CosyVoice-300M-25Hz"
    shutil.copytree(source, vendored)
    text = (source / "cosyvoice.yaml").read_text()
    assert "!name:matcha.utils.audio.mel_spectrogram" in text
    (vendored / "cosyvoice.yaml").write_text(text.replace("matcha.utils.audio.", "cosyvoice.matcha.audio."))
    audio = torch.from_numpy(tiny.tone_speech(1.0, 22050))[None]
    mapped, installed = CosyVoiceDecoder(vendored), CosyVoiceDecoder(source)
    assert torch.equal(mapped.prompt_mel(audio), installed.prompt_mel(audio))


def test_the_flow_runs_in_bfloat16_as_the_reference_runs_it(model_path, tts):
    import torch
    from models.cosyvoice_decoder import CosyVoiceDecoder

    half = CosyVoiceDecoder(model_path / "Step-Audio-TTS-3B" / "CosyVoice-300M-25Hz", dtype=torch.bfloat16)
    full = tts.decoders[None]
    voice = tts.voice(tts.registry_voice("Tingting")).condition
    tokens = np.random.default_rng(9).integers(0, 5120, 60).tolist()
    assert next(half.flow.parameters()).dtype == torch.bfloat16
    a, b = half.flow_mel(voice, tokens, 0, split=False)[0], full.flow_mel(voice, tokens, 0, split=False)[0]
    assert a.dtype == torch.float32 and a.shape == b.shape
    assert float((a - b).norm() / b.norm()) < 0.1  # bfloat16 rounding, not another computation


# -- a whole call --------------------------------------------------------------------------------


async def test_a_call_runs_through_the_controller_and_hanging_up_frees_everything(start_server, model_path, tmp_path):
    from testkit.peer import ClientPeer
    from config import AppConfig, ModelConfig, ServerConfig, StepAudioConfig
    from context.dialog import TranscriptStore
    from profiles import open_profile
    from testkit.speech import espeak

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


def test_voice_file_and_system_prompts_from_configuration(tmp_path):
    from models.base import ModelSetupError
    from profiles.stepaudio import read_clone, read_tts_prompts

    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "me.wav").write_bytes(b"RIFF")
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
    prompts_file.write_text(json.dumps({"without_speaker": "A", "with_speaker": "B {speaker}", "rap": "C", "humming": "D"}))
    assert read_tts_prompts(prompts_file) == SystemPrompts("A", "B {speaker}", "C", "D")
    prompts_file.write_text(json.dumps({"rap": "C"}))  # the rest keep their defaults
    assert read_tts_prompts(prompts_file) == SystemPrompts(rap="C")
    for bad in ({"singing": "x"}, {"rap": 3}, ["rap"]):
        prompts_file.write_text(json.dumps(bad))
        with pytest.raises(ModelSetupError, match="--stepaudio-tts-prompts"):
            read_tts_prompts(prompts_file)


def test_the_speaker_registry_reads_utf8_with_bom_and_gbk_and_says_where_it_comes_from(tmp_path):
    from models.base import ModelSetupError
    from models.stepaudio_tts import read_speakers

    info = {"Tingting": "你好，我是婷婷。"}
    for encoding in ("utf-8", "utf-8-sig", "gbk"):
        folder = tmp_path / encoding
        folder.mkdir()
        (folder / "speakers_info.json").write_bytes(json.dumps(info, ensure_ascii=False).encode(encoding))
        assert read_speakers(folder) == info
    with pytest.raises(ModelSetupError, match="--stepaudio-speakers") as error:
        read_speakers(tmp_path / "missing")
    assert "Step-Audio code repository" in str(error.value)


async def test_the_profile_finds_speakers_given_apart_from_the_weights(model_path, tmp_path):
    """The published TTS-3B folder has no speakers/: without a registry the profile refuses to start
    (before loading anything), and with --stepaudio-speakers it speaks from the folder given."""
    import shutil

    from config import ModelConfig, StepAudioConfig
    from models.base import ModelSetupError
    from profiles.loaded import close_models
    from profiles.stepaudio import load_stepaudio

    published = tmp_path / "published"
    published.mkdir()
    for name in ("Step-Audio-Tokenizer", "Step-Audio-Chat", "Step-Audio-TTS-3B"):
        (published / name).symlink_to(model_path / name) if name != "Step-Audio-TTS-3B" else None
    tts_dir = published / "Step-Audio-TTS-3B"
    tts_dir.mkdir()
    for item in (model_path / "Step-Audio-TTS-3B").iterdir():
        if item.name != "speakers":
            (tts_dir / item.name).symlink_to(item)
    with pytest.raises(ModelSetupError, match="speakers_info.json"):
        await load_stepaudio(StepAudioConfig(model_path=published, device="cpu"), ModelConfig())
    speakers = tmp_path / "code" / "speakers"
    shutil.copytree(model_path / "Step-Audio-TTS-3B" / "speakers", speakers)
    models = await load_stepaudio(StepAudioConfig(model_path=published, device="cpu", speakers=speakers), ModelConfig())
    try:
        assert models.tts.registry_voice("Tingting")["wav_path"] == str(speakers / "Tingting_prompt.wav")
    finally:
        await close_models(models)
