"""Call recordings (`--record`): ten minutes of frames from a client whose clock drifts, with jitter
and a stall, stay within a frame of the agent's side; a real call's WAV holds the caller on the left
and the agent on the right, behind the token, once the call has ended."""

from __future__ import annotations

import random
import wave
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from realtime.recording import CallRecording
from runtime.audio import FRAME_SAMPLES, SAMPLE_RATE
from testkit.ws_peer import WsPeer
from tests.test_openai_realtime import Scripted

pytestmark = pytest.mark.unit

MARK_EVERY = 500  # frames: a marker every 10 s
RESAMPLER_SAMPLES = 16  # 1 ms


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _channels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, SAMPLE_RATE)
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 2)
    return samples[:, 0], samples[:, 1]


def _marks(channel: np.ndarray) -> np.ndarray:
    """Where each marker (a loud frame among quiet ones) starts, in samples."""
    loud = np.flatnonzero(np.abs(channel.astype(np.int32)) > 20000)
    return loud[np.insert(np.diff(loud) > FRAME_SAMPLES * 10, 0, True)]


@pytest.mark.parametrize("ppm", [1000, -1000])
def test_ten_minutes_of_a_drifting_jittery_client_stay_within_a_frame_of_the_agent(tmp_path, ppm):
    """The caller's frames come at their own clock's pace (0.1 % slow or fast: 0.6 s over ten
    minutes), 0-15 ms late each, and not at all for 1.5 s at minute 4; the agent's are sent at
    48 kHz on the server's ticks. Every 10 s both sides carry a marker at the same moment."""
    clock, rng = Clock(), random.Random(7)
    recording = CallRecording(tmp_path / "call.wav", clock)
    frames, pace = 30_000, 0.02 * (1 + ppm / 1e6)
    # The caller frame made at each agent marker's moment carries the caller's marker.
    pairs = {round(j * 0.02 / pace): j for j in range(0, frames, MARK_EVERY)}
    arrivals = [(k * pace + rng.uniform(0, 0.015), "caller", k) for k in range(frames)]
    arrivals = [a for a in arrivals if not 240 <= a[0] < 241.5]  # the stall: lost, never resent
    kept = {k for _, _, k in arrivals}
    sends = [(k * 0.02, "agent", k) for k in range(frames)]
    quiet_caller, quiet_agent = np.full(FRAME_SAMPLES, 100, np.int16), np.full(960, 100, np.int16)
    for at, side, k in sorted(arrivals + sends):
        clock.now = at
        if side == "caller":
            recording.heard(np.full(FRAME_SAMPLES, 30000, np.int16) if k in pairs else quiet_caller)
        else:
            recording.sent(np.full(960, 30000, np.int16) if k % MARK_EVERY == 0 else quiet_agent, 48000)
    recording.close()
    caller, agent = _channels(tmp_path / "call.wav")
    assert abs(len(caller) / SAMPLE_RATE - max(max(arrivals)[0], sends[-1][0])) < 0.05  # as long as the call
    caller_marks, agent_marks = list(_marks(caller)), list(_marks(agent))
    assert len(agent_marks) == frames // MARK_EVERY
    heard = sorted(j for k, j in pairs.items() if k in kept)
    assert len(caller_marks) == len(heard) >= len(agent_marks) - 1
    offsets = np.array(caller_marks) - np.array([agent_marks[j // MARK_EVERY] for j in heard])
    # Within a frame, start to end (and the 48 -> 16 kHz resampler's own delay, a sample or two).
    assert np.max(np.abs(offsets)) <= FRAME_SAMPLES + RESAMPLER_SAMPLES, offsets


async def test_a_recorded_call_is_a_stereo_wav_behind_the_token_once_it_has_ended(start_server):
    agents = Scripted()
    server = await start_server(factory=agents, echo_cancel="off", record=True, auth_token="s3cret")
    headers = {"Authorization": "Bearer s3cret"}
    peer = WsPeer(server.url)
    peer.url += "?token=s3cret"  # as the page's WebSocket sends it
    session_id = await peer.connect()
    agents.tokenizer.transcript = "What is the capital of France?"
    peer.speak(np.full(16000, 0.1, np.float32), 16000)
    await peer.changed.wait_for(lambda: any(e["type"] == "response.done" for e in peer.events), timeout=30)
    url = f"{server.url}/api/sessions/{session_id}/recording"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as early:
            assert early.status == 409  # the call is still up
        session = server.registry.get(session_id)
        await peer.close()
        await session.closed.wait()
        async with http.get(url) as anonymous:
            assert anonymous.status == 401
        async with http.get(f"{server.url}/api/sessions/sess_none/recording", headers=headers) as missing:
            assert missing.status == 404
        async with http.get(url, headers=headers) as response:
            assert response.status == 200 and response.content_type == "audio/wav"
            (Path(server.config.server.data_dir) / "got.wav").write_bytes(await response.read())
    caller, agent = _channels(Path(server.config.server.data_dir) / "got.wav")
    spoke = np.flatnonzero(np.abs(caller) > 1000)
    answered = np.flatnonzero(np.abs(agent) > 1000)
    assert len(spoke) >= SAMPLE_RATE * 0.9 and len(answered) >= SAMPLE_RATE * 0.5  # a second asked, the answer heard
    assert spoke[-1] < answered[0]  # the answer came after the question, on the call's clock
    assert answered[0] - spoke[-1] < SAMPLE_RATE  # and within a second of it
