"""Integration: real transport, real Silero VAD, synthesized speech with a pause inside the utterance."""

from __future__ import annotations

import pytest

import time

import numpy as np

from bench.peer import ClientPeer, Notifier
from config import TurnConfig
from context.dialog import DialogContext
from controller.controller import Controller, SessionModels
from realtime.session import SessionIO
from tests.fakes import CountingTokenizer, CuedLM, ToneDecoder
from bench.speech import espeak
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
        controllers.append(Controller(io, models, DialogContext("Be brief.", 500), TurnConfig(commit_ms=750), "test"))
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
