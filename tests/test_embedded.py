"""The embedded profile with its real models (Whisper tiny.en, SmolLM2, piper) over real WebRTC."""

from __future__ import annotations

import asyncio
import base64
import gc
import time

import numpy as np
import pytest

from bench.metrics import normalize_words, word_error_rate
from config import AppConfig, ServerConfig
from context.dialog import TranscriptStore
from profiles import Profile
from profiles.embedded import EmbeddedModels
from runtime.memory import freeze_what_lives_on
from testkit.peer import ClientPeer
from testkit.room import SpeakerRoom
from testkit.speech import espeak
from tests.signals import resample
from tests.test_metrics import scrape
from tests.test_openai_realtime import client as realtime_client

pytestmark = pytest.mark.models

RATE = 48000
QUESTION = "What is the capital of France?"


def trimmed(pcm: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    return pcm[loud[0] : loud[-1] + 1]


def agent_audio(peer: ClientPeer, since: float, until: float) -> np.ndarray:
    """What the client received between two moments, at 16 kHz."""
    frames = [f.pcm for f in peer.received if since <= f.arrival <= until]
    return resample(np.concatenate(frames), RATE, 16000) if frames else np.zeros(0, dtype=np.float32)


@pytest.fixture
async def embedded_server(start_server, embedded_models: EmbeddedModels, tmp_path):
    from profiles import open_profile

    async def start(**overrides):
        config = AppConfig(server=ServerConfig(data_dir=tmp_path / "data"), models=embedded_models.config)
        profile: Profile = await open_profile(config, TranscriptStore(tmp_path / "data"), models=embedded_models)
        freeze_what_lives_on()  # as run_server does once the models are loaded
        return await start_server(factory=profile.factory, **overrides)

    yield start
    gc.unfreeze()


async def test_spoken_question_gets_a_spoken_answer(embedded_server, whisper_engine):
    question = trimmed(espeak(QUESTION, RATE))  # before the call: espeak blocks the shared event loop
    server = await embedded_server()
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    await peer.wait_event("session.created")
    await peer.changed.wait_for(lambda: peer.received, timeout=5)
    output = server.registry.get(session_id).output
    output.worst_gap_ms = 0.0

    peer.speak(question, RATE)
    completed = await peer.wait_event("conversation.item.input_audio_transcription.completed", timeout=30)
    assert word_error_rate(QUESTION, completed["transcript"]) <= 0.2, completed["transcript"]
    partials = [
        e for e in peer.events
        if e["type"] == "conversation.item.input_audio_transcription.delta" and e["item_id"] == completed["item_id"]
    ]
    assert partials and partials[-1]["_received"] <= completed["_received"]

    started = await peer.wait_event("response.audio.started", timeout=30)
    done = await peer.wait_event("response.done", timeout=90)
    assert done["response"]["status"] == "completed"
    reply = done["response"]["output_text"]
    deltas = "".join(e["delta"] for e in peer.events if e["type"] == "response.text.delta")
    assert reply and reply == deltas.strip()
    # The reply's last audio frame reaches the client shortly after the server is done with it.
    await peer.changed.wait_for(lambda: peer.received[-1].arrival > done["_received"] + 0.5, timeout=5)
    heard = agent_audio(peer, started["_received"] - 0.2, done["_received"] + 0.5)
    transcript = await whisper_engine.transcribe(heard)  # the harness's judge of received speech
    assert word_error_rate(reply, transcript) <= 0.35, (reply, transcript)

    # The output never starved while the three models worked in their threads: no gap the client's
    # jitter buffer would hear (the harness counts an underrun from 60 ms).
    assert output.worst_gap_ms <= 60, f"an output frame came {output.worst_gap_ms:.0f} ms after the one before"
    metrics = await peer.wait_event("metrics.turn")
    assert {"asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms"} <= set(metrics)
    await peer.close()

    # What a Prometheus scraper sees of that turn.
    samples = await scrape(server.url)
    assert samples[("voice_agent_turns_total", (("status", "completed"),))] == 1
    assert samples[("voice_agent_responses_total", ())] == 1
    for stage in ("asr_ms", "lm_ttft_ms", "tts_first_audio_ms", "server_v2v_ms"):
        assert samples[("voice_agent_stage_seconds_count", (("stage", stage),))] == 1
    assert any(name == "voice_agent_model_queue_depth" for name, _ in samples)


async def test_barge_in_truncates_the_reply_in_the_history(embedded_server, embedded_models):
    request = trimmed(espeak("Tell me a long story about a brave knight and a dragon.", RATE))
    interruption = trimmed(espeak("Wait, stop. Tell me something else.", RATE))
    server = await embedded_server()
    peer = ClientPeer(server.url)
    session_id = await peer.connect()
    await peer.wait_event("session.created")
    await peer.changed.wait_for(lambda: peer.received, timeout=5)

    peer.speak(request, RATE)
    await peer.wait_event("response.audio.started", timeout=60)
    # The interruption is kept, not answered: a reply to it (to its first words, "Wait,") would
    # be heard where the interrupted one must be silent.
    peer.send({"type": "session.update", "session": {"create_response": False}})
    await peer.wait_event("session.updated")
    await peer.wait_audio(1.0, timeout=10)  # a second of the reply heard (on a slow machine it comes late)
    peer.speak(interruption, RATE)
    done = await peer.wait_event("response.done", timeout=30)
    assert done["response"]["status"] == "interrupted"
    stopped_at = time.monotonic()

    full_reply = "".join(e["delta"] for e in peer.events if e["type"] == "response.text.delta")
    # The reply's history entry follows its user's turn, transcribed beside the reply (on a slow
    # machine after the interruption).
    asked = (await peer.wait_event("input_audio_buffer.speech_started"))["item_id"]
    await peer.wait_event("conversation.item.input_audio_transcription.completed", 30, lambda e: e["item_id"] == asked)
    transcript = await _transcript(server.url, session_id)
    assistant = [t for t in transcript if t["role"] == "assistant"]
    assert assistant and assistant[0]["status"] == "interrupted"
    heard, full = normalize_words(assistant[0]["text"]), normalize_words(full_reply)
    assert 0 < len(heard) < len(full) and heard == full[: len(heard)], (heard, full)

    # Silence follows the interruption at once (the output was flushed, not drained).
    await peer.changed.wait_for(lambda: peer.received[-1].arrival > stopped_at + 0.3, timeout=5)
    tail = [f.pcm for f in peer.received if f.arrival > stopped_at + 0.15]
    assert tail and max(float(np.sqrt(np.mean(p**2))) for p in tail[:5]) < 0.01
    await peer.close()


async def test_on_a_speakerphone_the_agent_does_not_interrupt_itself(embedded_server):
    """A caller without an echo canceller of their own, the agent's voice coming back into their
    microphone 150 ms later as loud as it was played: the reply plays on over its own echo. (The
    user talking over it at the echo's level is not yet heard reliably: README, Echo cancellation.)"""
    request = trimmed(espeak("Tell me a long story about a brave knight and a dragon.", RATE))
    server = await embedded_server()
    peer = ClientPeer(server.url, room=SpeakerRoom(150, 0.0), cancels_echo=False)
    await peer.connect()
    created = await peer.wait_event("session.created")
    assert created["session"]["echo_cancellation"] is True
    await peer.changed.wait_for(lambda: peer.received, timeout=5)

    peer.speak(request, RATE)
    started = await peer.wait_event("response.audio.started", timeout=60)
    # 4.5 s: past the guard's first 3 s, when it takes the echo as loud as the reply
    await peer.changed.wait_for(lambda: peer.received[-1].arrival > started["_received"] + 4.5, timeout=10)
    after = [(e["type"], round(e["_received"] - started["_received"], 2)) for e in peer.events if e["_received"] >= started["_received"]]
    assert not any(kind in ("response.audio.paused", "response.done") for kind, _ in after), after
    await peer.close()


async def _transcript(url: str, session_id: str) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/sessions/{session_id}/transcript") as response:
            assert response.status == 200
            return (await response.json())["turns"]


async def test_a_caller_who_vanishes_mid_reply_leaves_a_whole_history(embedded_server):
    """The network drops mid-reply (no hang-up, nothing more arrives): the call ends on its media
    timeout, and the transcript keeps the question and what of the reply was heard."""
    request = trimmed(espeak("Tell me a long story about a brave knight and a dragon.", RATE))
    server = await embedded_server(media_timeout_s=1.0)
    peer = ClientPeer(server.url, ping_interval_s=None)
    try:
        session_id = await peer.connect()
        session = server.registry.get(session_id)
        await peer.changed.wait_for(lambda: peer.received, timeout=5)
        peer.speak(request, RATE)
        await peer.wait_audio(1.0, timeout=60)
        peer.go_quiet()
        await asyncio.wait_for(session.closed.wait(), 10)
    finally:
        await peer.close()
    assert session.close_reason == "media_timeout"
    assert not session.tasks and server.registry.get(session_id) is None
    spoken = "".join(e["delta"] for e in peer.events if e["type"] == "response.text.delta")
    transcript = await _transcript(server.url, session_id)
    assert [t["role"] for t in transcript] == ["user", "assistant"], transcript
    assert word_error_rate("tell me a long story about a brave knight and a dragon", transcript[0]["text"]) < 0.5
    heard, said = normalize_words(transcript[1]["text"]), normalize_words(spoken)
    assert transcript[1]["status"] != "completed" and 0 < len(heard) < len(said) and heard == said[: len(heard)], (heard, said)


async def _speak_into(connection, pcm: np.ndarray, rate: int, then_silence_s: float) -> None:
    """A microphone on the OpenAI Realtime API: 100 ms appends in real time, then silence."""
    audio = np.concatenate([pcm, np.zeros(int(then_silence_s * rate), np.float32)])
    samples = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    step = rate // 10
    for start in range(0, len(samples), step):
        await connection.input_audio_buffer.append(audio=base64.b64encode(samples[start : start + step].tobytes()).decode())
        await asyncio.sleep(0.1)  # pacing the microphone, not waiting for an event


async def test_the_openai_sdk_asks_and_hears_an_answer(embedded_server, whisper_engine):
    question = trimmed(espeak(QUESTION, 24000))
    server = await embedded_server()
    async with realtime_client(server.url).realtime.connect(model="embedded") as connection:
        await connection.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}}
        )
        events, audio = [], []
        async with asyncio.timeout(90), asyncio.TaskGroup() as group:
            group.create_task(_speak_into(connection, question, 24000, then_silence_s=6.0))
            async for event in connection:
                events.append(event)
                if event.type == "response.output_audio.delta":
                    audio.append(np.frombuffer(base64.b64decode(event.delta), "<i2"))
                if event.type == "response.done":
                    break
    kinds = [e.type for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    heard = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed").transcript
    assert word_error_rate(QUESTION, heard) <= 0.2, heard
    done = events[-1]
    assert done.response.status == "completed"
    said = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert said.strip() and said.strip() == done.response.output[0].content[0].transcript.strip()
    pcm = np.concatenate(audio).astype(np.float32) / 32768
    assert len(pcm) > 24000 * 0.5
    transcript = await whisper_engine.transcribe(resample(pcm, 24000, 16000))
    assert word_error_rate(said, transcript) <= 0.35, (said, transcript)


async def test_the_openai_sdk_cancels_a_reply(embedded_server):
    request = trimmed(espeak("Tell me a long story about a brave knight and a dragon.", 24000))
    server = await embedded_server()
    async with realtime_client(server.url).realtime.connect(model="embedded") as connection:
        events = []
        async with asyncio.timeout(90), asyncio.TaskGroup() as group:
            speaking = group.create_task(_speak_into(connection, request, 24000, then_silence_s=10.0))
            async for event in connection:
                events.append(event)
                if event.type == "response.output_audio.delta" and sum(e.type == "response.output_audio.delta" for e in events) == 15:
                    await connection.response.cancel()  # a second and a half into the reply
                if event.type == "response.done":
                    speaking.cancel()
                    break
        done = events[-1]
        assert done.response.status == "cancelled"
        said = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        kept = done.response.output[0].content[0].transcript
        assert normalize_words(said)[: len(normalize_words(kept))] == normalize_words(kept) and len(kept) < len(said), (kept, said)
        # The app played less than the server sent: the history keeps what it played.
        await connection.conversation.item.truncate(item_id=done.response.output[0].id, content_index=0, audio_end_ms=500)
        truncated = await _next_event(connection, "conversation.item.truncated")
        assert truncated.item_id == done.response.output[0].id and truncated.audio_end_ms == 500
        session_id = next(e for e in events if e.type == "session.created").session.id
    history = await _transcript(server.url, session_id)
    assert history[-1]["role"] == "assistant" and len(history[-1]["text"]) < len(kept)
    assert normalize_words(kept)[: len(normalize_words(history[-1]["text"]))] == normalize_words(history[-1]["text"])


async def test_the_openai_sdk_commits_its_own_turns(embedded_server):
    """turn_detection null: however long the silence, the turn ends when the client commits it."""
    question = trimmed(espeak(QUESTION, 24000))
    server = await embedded_server()
    async with realtime_client(server.url).realtime.connect(model="embedded") as connection:
        await connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        updated = await _next_event(connection, "session.updated")
        assert updated.session.audio.input.turn_detection is None
        events: list = []
        before_commit: list[str] = []

        async def speak_then_commit() -> None:
            await _speak_into(connection, question, 24000, then_silence_s=3.0)  # longer than any commit_ms
            before_commit.extend(e.type for e in events)
            await connection.input_audio_buffer.commit()

        async with asyncio.timeout(60), asyncio.TaskGroup() as group:
            group.create_task(speak_then_commit())
            async for event in connection:
                events.append(event)
                if event.type == "response.done":
                    break
    assert "input_audio_buffer.speech_started" in before_commit and "input_audio_buffer.committed" not in before_commit
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.committed") == 1
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.committed")
    heard = next(e for e in events if e.type == "conversation.item.input_audio_transcription.completed").transcript
    assert word_error_rate(QUESTION, heard) <= 0.2, heard
    assert events[-1].response.status == "completed"


async def _next_event(connection, kind: str):
    async with asyncio.timeout(10):
        async for event in connection:
            if event.type == kind:
                return event
    raise AssertionError(f"no {kind}")


def test_a_turn_is_timed_at_start_up_and_gives_the_server_its_capacity(embedded_models):
    """One whole turn ran through every engine as the profile loaded: its CPU is what a call costs
    here, and a two-core machine carries at least one call within the default load limit."""
    from config import DEFAULT_MAX_LOAD
    from realtime.capacity import LoadMonitor, call_share

    assert 0.05 < embedded_models.turn_cpu_s < 30
    monitor = LoadMonitor(DEFAULT_MAX_LOAD, call_share(embedded_models.turn_cpu_s))
    assert monitor.capacity is not None and monitor.capacity >= 1 and monitor.admits(0)
