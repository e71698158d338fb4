"""`python -m bench.soak`: calls that go on talking, and what the server holds through them and after.

    python -m bench.soak --local --sessions 8 --minutes 60
    python -m bench.soak --url http://127.0.0.1:8080 --server-pid PID --sessions 4 --minutes 10

Each session is a caller who asks three questions in a WebRTC call, hangs up and calls again,
until the time is up. Before the calls (after one warm-up round) and every few seconds during them, the
server's resident memory, threads and open files are read from /proc, and its asyncio tasks from
`/healthz`; again once every call has hung up. Results: soak.json, soak.md and soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
import soxr

from bench.process import Holdings
from bench.scenarios import QUESTIONS, RATE, Voice
from realtime.webrtc import use_loopback_ice_only
from runtime.tasks import TaskOwner
from testkit.local import local_server
from testkit.peer import ClientPeer

PEER_RATE = 48000
REPLY_TIMEOUT_S = 60.0
THINK_S = 1.0  # the caller's pause between a reply's end and the next question
TURNS_PER_CALL = 3  # then the caller hangs up and calls again
WARM_UP_FRACTION = 0.3  # the memory slope is fitted after this share of the run
SETTLE_TIMEOUT_S = 30.0
SETTLE_POLL_S = 0.5
SETTLE_READINGS = 5
# piper's run buffers come and go with each run (up to ~200 MB), and the server's free memory
# with each release (once a minute): a minute always has a moment with neither.
FLOOR_WINDOW_S = 60.0


@dataclass
class Sample:
    at_s: float  # since the calls began
    sessions: int
    tasks: int
    holdings: Holdings


@dataclass
class SoakResult:
    sessions: int
    minutes: float
    calls: int = 0  # after the warm-up round
    turns: int = 0
    unanswered: int = 0  # questions without a completed reply within REPLY_TIMEOUT_S
    before: Sample | None = None
    after: Sample | None = None
    samples: list[Sample] = field(default_factory=list)

    def rss_slope_mb_per_hour(self) -> float | None:
        """RSS growth after warm-up, fitted over the samples: MB per hour for the whole server."""
        return _slope_per_hour([(s.at_s, s.holdings.rss_mb) for s in self._late()])

    def rss_floor_slope_mb_per_hour(self) -> float | None:
        """The same, fitted over `rss_floor`: what the server keeps between model runs, without
        the buffers of the runs in flight at each sample."""
        return _slope_per_hour(rss_floor(self._late()))

    def _late(self) -> list[Sample]:
        return [s for s in self.samples if s.at_s >= WARM_UP_FRACTION * self.minutes * 60]

    def summary(self) -> dict[str, Any]:
        slope, floor = self.rss_slope_mb_per_hour(), self.rss_floor_slope_mb_per_hour()
        assert self.before is not None and self.after is not None
        return {
            "sessions": self.sessions,
            "minutes": self.minutes,
            "calls": self.calls,
            "turns": self.turns,
            "unanswered": self.unanswered,
            "rss_mb_per_hour": slope,
            "rss_mb_per_session_hour": None if slope is None else round(slope / self.sessions, 2),
            "rss_floor_mb_per_hour": floor,
            "rss_floor_mb_per_session_hour": None if floor is None else round(floor / self.sessions, 2),
            "left_after_hang_up": {
                "threads": self.after.holdings.threads - self.before.holdings.threads,
                "fds": self.after.holdings.fds - self.before.holdings.fds,
                "fds_by_kind": self.after.holdings.fds_by_kind_beyond(self.before.holdings),
                "tasks": self.after.tasks - self.before.tasks,
                "sessions": self.after.sessions,
                "rss_mb": round(self.after.holdings.rss_mb - self.before.holdings.rss_mb, 1),
            },
        }


def rss_floor(samples: list[Sample]) -> list[tuple[float, float]]:
    """(middle of the window in s, MB) for each FLOOR_WINDOW_S with samples: the least RSS of each
    process in the window, summed. The server's least comes after a release of free memory, piper's
    between runs, each at its own moment: the least of their sum would hold whatever the other
    held at that moment."""
    windows: dict[int, dict[str, float]] = {}
    for s in samples:
        least = windows.setdefault(int(s.at_s // FLOOR_WINDOW_S), {})
        for name, rss in (s.holdings.rss_mb_by_process or {"all": s.holdings.rss_mb}).items():
            least[name] = min(least.get(name, rss), rss)
    return [((window + 0.5) * FLOOR_WINDOW_S, sum(least.values())) for window, least in sorted(windows.items())]


def _slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    slope = np.polyfit([at for at, _ in points], [mb for _, mb in points], 1)[0]
    return round(float(slope) * 3600, 2)


class Soak:
    """Owns one soak run: the calls, the sampler and what they measured."""

    def __init__(self, url: str, pid: int, sessions: int, minutes: float, sample_s: float) -> None:
        self.url = url
        self.pid = pid
        self.result = SoakResult(sessions, minutes)
        self._sample_s = sample_s
        self._began = 0.0
        self._questions: list[np.ndarray] = []

    async def run(self) -> SoakResult:
        voice = Voice()
        self._questions = [soxr.resample(voice.say(q), RATE, PEER_RATE).astype(np.float32) for q in QUESTIONS]
        async with aiohttp.ClientSession() as http:
            # Warm-up, as many calls at once as the run: what they load (model threads, buffers) is
            # kept for later calls, not leaked.
            await self._calls(time.monotonic() + 5)
            self.result.before = await self._settled(http)
            self.result.calls = 0
            self._began = time.monotonic()
            tasks = TaskOwner("soak")
            stop = asyncio.Event()
            sampler = tasks.spawn(self._sample_every(http, stop), "sampler")
            try:
                await self._calls(self._began + self.result.minutes * 60)
                stop.set()  # not cancelled mid-request: the server would hold that connection a while
                await sampler
            finally:
                await tasks.aclose()
            self.result.after = await self._settled(http)
        return self.result

    async def _calls(self, deadline: float) -> None:
        async with asyncio.TaskGroup() as calls:
            for index in range(self.result.sessions):
                calls.create_task(self._session(deadline, index))

    async def _session(self, deadline: float, index: int) -> None:
        """Call after call, TURNS_PER_CALL questions each, until `deadline`: whatever a call
        leaves behind adds up with the calls."""
        turn = index
        while time.monotonic() < deadline:
            await self._call(deadline, turn)
            turn += TURNS_PER_CALL

    async def _call(self, deadline: float, first: int) -> None:
        peer = ClientPeer(self.url)
        self.result.calls += 1
        try:
            await peer.connect()
            for turn in range(first, first + TURNS_PER_CALL):
                if time.monotonic() >= deadline:
                    break
                peer.speak(self._questions[turn % len(self._questions)], PEER_RATE)
                try:
                    await peer.wait_event(
                        "response.done", timeout=REPLY_TIMEOUT_S, predicate=lambda e: e["response"]["status"] == "completed"
                    )
                    self.result.turns += 1
                except TimeoutError:
                    self.result.unanswered += 1
                peer.events.clear()
                await asyncio.sleep(THINK_S)  # the caller's pause, not a wait for an event
        finally:
            await peer.close()

    async def _sample(self, http: aiohttp.ClientSession) -> Sample:
        async with http.get(f"{self.url}/healthz") as response:
            health = await response.json()
        at = time.monotonic() - self._began if self._began else 0.0
        return Sample(round(at, 1), health["sessions"], health["tasks"], Holdings.of(self.pid))

    async def _sample_every(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.result.samples.append(await self._sample(http))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._sample_s)

    async def _settled(self, http: aiohttp.ClientSession) -> Sample:
        """What the server holds once no session is left (each hung-up call is torn down in the
        background): the least of SETTLE_READINGS readings, SETTLE_POLL_S apart, with none left.
        The server opens files for a moment on its own (its load sampler reads /proc/N/stat of
        every process each second; a hung-up call's connection closes once its end is read), and
        one reading can catch one; what a call leaves behind is in every reading."""
        give_up = time.monotonic() + SETTLE_TIMEOUT_S
        readings: list[Sample] = []
        while True:
            sample = await self._sample(http)
            readings = [*readings, sample] if sample.sessions == 0 else []
            if len(readings) == SETTLE_READINGS or time.monotonic() > give_up:
                return min(readings or [sample], key=lambda r: (r.holdings.fds, r.holdings.threads))
            await asyncio.sleep(SETTLE_POLL_S)  # polling another process's state


def write(result: SoakResult, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "soak.json").write_text(
        json.dumps({"summary": summary, "before": asdict(result.before), "after": asdict(result.after),
                    "samples": [asdict(s) for s in result.samples]}, indent=1)
    )
    left = summary["left_after_hang_up"]
    text = (
        f"### Soak: {result.sessions} sessions, {result.minutes} min\n\n"
        f"calls {result.calls}, turns answered {result.turns}, unanswered {result.unanswered}; "
        f"RSS slope after warm-up {summary['rss_mb_per_hour']} MB/h "
        f"({summary['rss_mb_per_session_hour']} MB per session-hour); its floor (least RSS of each process in each minute, summed) "
        f"{summary['rss_floor_mb_per_hour']} MB/h ({summary['rss_floor_mb_per_session_hour']} MB per session-hour)\n\n"
        f"after every call hung up, beyond the baseline: threads {left['threads']:+d}, open files {left['fds']:+d} {left['fds_by_kind']}, "
        f"asyncio tasks {left['tasks']:+d}, sessions {left['sessions']}, RSS {left['rss_mb']:+.1f} MB\n"
    )
    (out / "soak.md").write_text(text)
    _plot(result, out / "soak.png")
    return text


def _plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.at_s / 60 for s in result.samples]
    figure, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for axis, label, values in (
        (axes[0], "RSS (MB)", [s.holdings.rss_mb for s in result.samples]),
        (axes[1], "threads", [s.holdings.threads for s in result.samples]),
        (axes[2], "open files", [s.holdings.fds for s in result.samples]),
    ):
        axis.plot(minutes, values)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    floor = rss_floor(result.samples)
    axes[0].plot([at / 60 for at, _ in floor], [rss for _, rss in floor], label="least of each process in each minute, summed")
    axes[0].legend(loc="lower right")
    axes[-1].set_xlabel("minutes")
    figure.suptitle(f"server during {result.sessions} looping calls")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server (give --server-pid too)")
    target.add_argument("--local", action="store_true", help="start a local server (embedded profile) for the run")
    parser.add_argument("--server-pid", type=int, help="pid of the --url server")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.url and not args.server_pid:
        parser.error("--url needs --server-pid (the server's memory is read from /proc)")
    return args


async def soak(url: str, pid: int, sessions: int, minutes: float, sample_s: float) -> SoakResult:
    if urlparse(url).hostname in ("127.0.0.1", "localhost"):
        use_loopback_ice_only()
    return await Soak(url, pid, sessions, minutes, sample_s).run()


async def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = args.out / ("soak-" + time.strftime("%Y%m%d-%H%M%S"))
    if args.local:
        async with local_server("embedded", "--max-load", "off") as (url, pid):  # every call, however many
            result = await soak(url, pid, args.sessions, args.minutes, args.sample_s)
    else:
        result = await soak(args.url, args.server_pid, args.sessions, args.minutes, args.sample_s)
    print(write(result, out))
    print(f"results: {out}")


if __name__ == "__main__":
    asyncio.run(main())
