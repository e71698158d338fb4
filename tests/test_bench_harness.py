"""The harness end to end against the loopback profile: the echo is the 'reply', its delay known."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import report
from bench.harness import as_rows, run_sessions
from bench.process import Holdings, process_usage
from runtime.procfs import process_tree
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


def test_what_a_server_holds_includes_its_children():
    """piper runs in a child of the server: the soak and the per-session figures must count it."""
    mine = Holdings.of(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        child.stdout.readline()  # it has started
        assert child.pid in process_tree(os.getpid())
        with_child = Holdings.of(os.getpid())
        assert with_child.threads >= mine.threads + 1 and with_child.rss_mb >= mine.rss_mb + 1
        assert set(with_child.rss_mb_by_process) == {"server", Path(sys.executable).name}
        assert sum(with_child.rss_mb_by_process.values()) == pytest.approx(with_child.rss_mb, abs=0.2)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        child.stdout.close()
    assert child.pid not in process_tree(os.getpid())


def test_open_files_are_counted_by_kind():
    """What a soak finds left open is named by kind: a pipe and a socket opened here show as such."""
    import socket

    before = Holdings.of(os.getpid())
    read_end, write_end = os.pipe()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        held = Holdings.of(os.getpid())
        assert held.fds == before.fds + 3 and sum(held.fds_by_kind.values()) == held.fds
        assert held.fds_by_kind_beyond(before) == {"pipe": 2, "socket": 1}
    finally:
        sock.close()
        os.close(read_end)
        os.close(write_end)
    assert Holdings.of(os.getpid()).fds_by_kind_beyond(before) == {}


def test_a_child_that_has_ended_does_not_stop_the_reading():
    """piper's process can end between listing the tree and reading it (killed, restarted)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not yet reaped: a zombie
    try:
        assert child.pid in process_tree(os.getpid())
        held = Holdings.of(os.getpid())
        cpu, rss = process_usage(os.getpid())
        assert held.rss_mb > 10 and rss > 10 and cpu > 0
    finally:
        child.wait()


async def test_a_stages_cpu_is_read_by_its_threads_name():
    """A model worker names its threads after its stage: the harness reads each stage's CPU from
    /proc by that name, the threads an inference library starts from there included."""
    import asyncio
    import threading
    import time

    from bench.process import cpu_by_stage
    from runtime.workers import ModelWorker

    burned, release = threading.Event(), threading.Event()

    def start_helper() -> threading.Thread:  # in the worker's thread, as a library starts its own
        def burn() -> None:
            until = time.thread_time() + 0.3
            while time.thread_time() < until:
                pass
            burned.set()
            release.wait()

        helper = threading.Thread(target=burn)
        helper.start()
        return helper

    worker = ModelWorker("stage-probe")
    before = cpu_by_stage(os.getpid())
    helper = await worker.run(start_helper)
    try:
        assert await asyncio.to_thread(burned.wait, 10)
        used = cpu_by_stage(os.getpid()).get("stage-probe", 0.0) - before.get("stage-probe", 0.0)
    finally:
        release.set()
        helper.join()
        worker.close()
    assert used >= 0.25


def test_the_machine_line_names_the_cpu_its_vector_units_and_cores():
    from bench.machine import describe, machine

    info = machine()
    assert info["cores"] >= 1 and info["cpu"]
    line = describe({**info, "cpu": "AMD EPYC 7B12", "flags": ["avx2", "fma"], "cores": 2, "load_1m": 0.3})
    assert line.startswith("AMD EPYC 7B12, AVX2 (no AVX-512), 2 cores") and "load 0.3" in line
    assert "AVX-512 AVX512_VNNI" in describe({**info, "flags": ["avx2", "avx512f", "avx512_vnni"]})
