"""The harness end to end against the loopback profile: the echo is the 'reply', its delay known."""

from __future__ import annotations

import numpy as np
import pytest

from bench import report
from bench.harness import as_rows, run_sessions
from bench.scenarios import RATE, Scenario, Utterance
from config import LoopbackConfig
from controller.loopback import LoopbackAgent

pytestmark = pytest.mark.unit

DELAY_MS = 1500


def clip() -> np.ndarray:
    t = np.arange(RATE) / RATE
    tone = 0.3 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return np.concatenate([np.zeros(RATE // 5), tone, np.zeros(RATE // 5)]).astype(np.float32)


@pytest.mark.parametrize(("transport", "events"), [("webrtc", True), ("ws", True), ("webrtc", False)])
async def test_harness_measures_the_echo_delay_and_writes_a_report(start_server, tmp_path, transport, events):
    """`events=False` is `--signaling plain`: another server, measured from its audio alone."""
    server = await start_server(factory=lambda io: LoopbackAgent(io, LoopbackConfig(delay_ms=DELAY_MS)))
    scenario = Scenario("echo", (Utterance("", clip()),))
    results, totals = await run_sessions(
        server.url, [scenario], 1, transcribe=None, events=events, transport=transport
    )
    assert len(results) == 1
    turn = results[0]
    assert turn.speech_end_s is not None and abs(turn.speech_end_s - 1.2) < 0.05
    # The echo of the tone's start comes DELAY_MS after it was sent, i.e. DELAY_MS - 1 s after the
    # tone ended, plus the transport and the loopback's playout reserve.
    assert turn.client_v2v_ms is not None and DELAY_MS - 1000 <= turn.client_v2v_ms <= DELAY_MS - 1000 + 600
    assert not turn.false_cutoff and not turn.false_start

    by_level = {1: {"turns": as_rows(results), **totals.as_dict()}}
    text = report.write(by_level, tmp_path / "out")
    assert "| client_v2v_ms | 1 |" in text
    assert (tmp_path / "out" / "latency_cdf.png").stat().st_size > 1000
    assert (tmp_path / "out" / "summary.md").read_text().startswith("### 1 simultaneous")
