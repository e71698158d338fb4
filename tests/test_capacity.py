"""Capacity, known and kept: the load the server measures of itself, the share each call counts
for, and a new call refused with 503 `at_capacity` (WebRTC, `/ws`, `/v1/realtime` alike) while
the calls already up go on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from realtime.capacity import AVERAGE_S, LAG_FULL_MS, RETRY_AFTER_S, LoadMonitor, call_share
from runtime.procfs import usable_cores
from testkit.peer import ClientPeer, OfferRefused

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.unit

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


def test_each_call_counts_for_its_share_and_the_limit_keeps_the_budget():
    monitor = LoadMonitor(max_load=0.7, call_share=0.3, cores=2)
    assert [monitor.admits(calls) for calls in range(4)] == [True, True, False, False]
    assert monitor.capacity == 2 and monitor.load(2).as_dict() == {"cpu": 0.0, "loop_lag": 0.0, "queued": 0.0, "calls": 0.6, "load": 0.6}
    unlimited = LoadMonitor(max_load=None, call_share=0.3, cores=2)
    assert unlimited.admits(100) and unlimited.capacity is None
    # A turn of 2.4 CPU seconds every 6 s on 2 cores is a fifth of the machine.
    assert call_share(2.4, cores=2) == pytest.approx(0.2)


def test_what_it_measures_of_itself_is_averaged_and_counts_too():
    monitor = LoadMonitor(max_load=0.7, call_share=0.1, cores=2)
    for _ in range(int(3 * AVERAGE_S)):  # a minute's worth of both cores busy
        monitor.observe(cpu_s=2.0, period_s=1.0, worst_lag_ms=0.0, queued=0)
    assert monitor.load(0).cpu == pytest.approx(1.0, abs=0.05) and not monitor.admits(0)
    busy = LoadMonitor(max_load=0.7, call_share=0.1, cores=2)
    busy.observe(cpu_s=2.0, period_s=1.0, worst_lag_ms=0.0, queued=0)  # one busy second: a turn, not a full machine
    assert busy.load(0).cpu == pytest.approx(1.0 / AVERAGE_S) and busy.admits(0)
    late = LoadMonitor(max_load=0.7, call_share=0.1, cores=2)
    for _ in range(int(3 * AVERAGE_S)):
        late.observe(cpu_s=0.2, period_s=1.0, worst_lag_ms=LAG_FULL_MS, queued=8)
    reading = late.load(0)
    assert reading.loop_lag == pytest.approx(1.0, abs=0.05) and reading.queued == pytest.approx(1.0, abs=0.05)


async def test_a_call_past_capacity_is_refused_at_once_and_the_others_go_on(start_server):
    server = await start_server(call_share=0.3, max_load=0.7)
    first, second, third = ClientPeer(server.url), ClientPeer(server.url), ClientPeer(server.url)
    await first.connect()
    await second.connect()
    with pytest.raises(OfferRefused) as refused:
        await third.connect()
    assert (refused.value.status, refused.value.body["error"]["code"]) == (503, "at_capacity")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/offer", json={"sdp": "v=0\r\nm=audio", "type": "offer"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == str(RETRY_AFTER_S)
        for path in ("/ws", "/v1/realtime"):
            async with http.get(f"{server.url}{path}", headers=UPGRADE) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (503, "at_capacity")
        async with http.get(f"{server.url}/healthz") as r:
            health = await r.json()
        assert (health["admitting"], health["capacity"], health["load"]["calls"]) == (False, 2, 0.6)
        # The calls up are untouched: their audio still comes back.
        heard = len(first.received)
        await first.changed.wait_for(lambda: len(first.received) > heard + 10, timeout=5)
        leaving = server.registry.get(second.session_id)
        await second.close()
        await asyncio.wait_for(leaving.closed.wait(), 5)
        async with http.get(f"{server.url}/healthz") as r:
            assert (await r.json())["admitting"] is True
    await third.close()
    fourth = ClientPeer(server.url)
    await fourth.connect()  # room again
    await fourth.close()
    await first.close()



def test_the_cores_counted_are_those_the_process_may_use(tmp_path):
    """Pinned to one core (taskset, as a cpuset does) it counts one; a container's CPU quota caps
    what the affinity shows (cgroup v2 and v1 files); no quota leaves the affinity."""
    script = "from runtime.procfs import usable_cores; print(usable_cores())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert pinned.stdout.strip() == "1"
    cores = len(os.sched_getaffinity(0))
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert usable_cores(tmp_path / "v2") == min(cores, 2)  # 1.5 CPUs keep two cores partly busy
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path / "v2") == cores
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path / "v1") == 1
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path / "v1") == cores
    assert usable_cores(tmp_path / "none") == cores
