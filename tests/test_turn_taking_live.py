"""Integration: real transport, real Silero VAD (and real Moonshine where words matter),
synthesized speech; the reply is a deterministic tone, so what is checked is the turn-taking."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest

from config import TurnConfig
from context.dialog import DialogContext
from controller.backchannel import is_backchannel
from controller.controller import Controller, SessionModels
from profiles.embedded import EmbeddedModels
from realtime.session import SessionIO
from streaming_tokenizer.base import StreamingTokenizer
from testkit.notifier import Notifier
from testkit.peer import ClientPeer
from testkit.speech import espeak
from tests.fakes import CountingTokenizer, CuedLM, ToneDecoder
from vad.engines import SileroDetector

pytestmark = pytest.mark.models

RATE = 48000


def trimmed(pcm: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    return pcm[loud[0] : loud[-1] + 1]


async def test_no_answer_inside_a_400_ms_pause(start_server):
    controllers: list[Controller] = []

    def factory(io: SessionIO) -> Controller:
        notifier = Notifier()
        models = SessionModels(SileroDetector(), CountingTokenizer(notifier), CuedLM(notifier), ToneDecoder(notifier))
        controllers.append(Controller(io, models, DialogContext("Be brief.", 500), TurnConfig().updated({"commit_ms": 750}), "test"))
        return controllers[-1]

    server = await start_server(factory=factory)
    first = trimmed(espeak("Please book a table for two", RATE))
    second = trimmed(espeak("at seven tonight", RATE))
    gap = np.zeros(int(0.4 * RATE), dtype=np.float32)
    clip = np.concatenate([first, gap, second])

    peer = ClientPeer(server.url)
    await peer.connect()
    await peer.wait_event("session.created")
    await peer.changed.wait_for(lambda: peer.received, timeout=5)  # media is flowing both ways
    spoken_at = time.monotonic()
    peer.speak(clip, RATE)
    clip_end = spoken_at + len(clip) / RATE

    created = await peer.wait_event("response.created", timeout=15)
    audio = await peer.wait_event("response.audio.started", timeout=10)
    # Nothing answered inside the pause: the reply comes only after the whole clip was sent.
    assert created["_received"] > clip_end
    assert audio["_received"] > clip_end
    controller = controllers[0]
    counters = controller.counters
    assert counters.responses == 1
    # The pause was long enough to speculate (250 ms) and the speech after it cancelled that.
    assert counters.speculative_starts >= 2 and counters.speculative_cancels >= 1
    transcripts = [e for e in peer.events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(transcripts) == 1
    frames = int(transcripts[0]["transcript"].split()[2])
    assert frames * 0.02 >= len(clip) / RATE  # one utterance spanning both phrases and the pause
    metrics = await peer.wait_event("metrics.turn", timeout=15)
    assert 740 <= metrics["endpoint_ms"] <= 800
    await peer.close()


class Agents:
    """Builds each call's Controller (real Silero, the given tokenizer, a cued LM, a tone decoder)
    and keeps them for the test to look into."""

    def __init__(self, tokenizer: Callable[[Notifier], StreamingTokenizer], config: TurnConfig, reply: str, hold: bool = False):
        self.controllers: list[Controller] = []
        self.lms: list[CuedLM] = []
        self._tokenizer, self._config, self._reply, self._hold = tokenizer, config, reply, hold

    def __call__(self, io: SessionIO) -> Controller:
        notifier = Notifier()
        self.lms.append(CuedLM(notifier, reply=self._reply, hold=self._hold))
        models = SessionModels(SileroDetector(), self._tokenizer(notifier), self.lms[-1], ToneDecoder(notifier))
        self.controllers.append(Controller(io, models, DialogContext("Be brief.", 500), self._config, "test"))
        return self.controllers[-1]


async def call(url: str) -> ClientPeer:
    peer = ClientPeer(url)
    await peer.connect()
    await peer.wait_event("session.created")
    await peer.changed.wait_for(lambda: peer.received, timeout=5)  # media is flowing both ways
    return peer


async def test_a_backchannel_over_the_reply_pauses_it_and_it_resumes_whole(start_server, embedded_models: EmbeddedModels):
    reply = " ".join(f"w{i}" for i in range(25))  # 5 s of the tone
    agents = Agents(lambda _: embedded_models.session_tokenizer(), TurnConfig().updated({"type": "vad"}), reply)
    question, okay = trimmed(espeak("Tell me about the moon.", RATE)), trimmed(espeak("Okay.", RATE))
    server = await start_server(factory=agents)
    peer = await call(server.url)

    peer.speak(question, RATE)
    started = await peer.wait_event("response.audio.started", timeout=15)
    await peer.changed.wait_for(lambda: peer.received[-1].arrival > started["_received"] + 1.0, timeout=5)
    peer.speak(okay, RATE)
    paused = await peer.wait_event("response.audio.paused", timeout=5)
    resumed = await peer.wait_event("response.audio.resumed", timeout=10)
    assert paused["response_id"] == resumed["response_id"] == started["response_id"]
    assert resumed["item_id"] is not None and resumed["transcript"].strip(), resumed  # words were heard ...
    assert is_backchannel(resumed["transcript"])  # ... and they were "okay"
    done = await peer.wait_event("response.done", timeout=15)
    assert (done["response"]["status"], done["response"]["output_text"]) == ("completed", reply)

    controller = agents.controllers[0]
    assert (controller.counters.resumes, controller.counters.bargeins, controller.counters.responses) == (1, 0, 1)
    assert [(t.role, t.status) for t in controller.context.turns] == [("user", "completed"), ("assistant", "completed")]
    # Nothing of the reply was lost to the pause: all 5 s of it went out.
    assert controller.io.output.audio_frames_sent >= 250
    assert len(agents.lms[0].calls) == 1
    await peer.close()


async def test_speech_resuming_after_an_early_commit_stays_one_turn(start_server, embedded_models: EmbeddedModels):
    # The commit comes inside the pause; the LM holds its first word, so nothing is heard before
    # the user goes on.
    agents = Agents(lambda _: embedded_models.session_tokenizer(), TurnConfig().updated({"type": "vad", "commit_ms": 500}), "Sure.", hold=True)
    first, rest = trimmed(espeak("I want to book a table", RATE)), trimmed(espeak("for two people tomorrow evening.", RATE))
    clip = np.concatenate([first, np.zeros(int(0.9 * RATE), dtype=np.float32), rest])
    server = await start_server(factory=agents)
    peer = await call(server.url)

    peer.speak(clip, RATE)
    early = await peer.wait_event("response.created", timeout=15)
    merged = await peer.wait_event("response.done", timeout=15)
    assert merged["response"]["id"] == early["response"]["id"]
    assert (merged["response"]["status"], merged["response"]["output_text"]) == ("interrupted", "")
    await peer.changed.wait_for(lambda: len([e for e in peer.events if e["type"] == "response.created"]) == 2, timeout=15)
    agents.lms[0].release()
    done = await peer.wait_event("response.done", timeout=15, predicate=lambda e: e["response"]["id"] != early["response"]["id"])
    assert done["response"]["status"] == "completed"

    controller = agents.controllers[0]
    assert controller.counters.late_resumes == 1 and controller.counters.bargeins == 0
    items = {e["item_id"] for e in peer.events if e["type"] == "conversation.item.input_audio_transcription.completed"}
    assert len(items) == 1  # one utterance, one item
    turns = controller.context.turns
    assert [t.role for t in turns] == ["user", "assistant"]
    words = turns[0].text.lower()
    assert "table" in words and "people" in words, turns[0].text  # transcribed whole
    assert agents.lms[0].calls[-1][-1].content == turns[0].text
    await peer.close()
