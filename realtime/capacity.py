"""How loaded the server is, and whether it can carry one more call.

A call's turns come in bursts: callers that speak at once all want their reply within the same
second. So beside what the server measures of itself (its CPU, the event loop's lateness, the
calls queued at the models), each call counts for the share of the machine its turn takes
(`call_share`, from a turn timed at start-up): a new call is admitted only while every call,
speaking at once, would still be served within the budget. A refused caller gets HTTP 503
`at_capacity` with `Retry-After`, at once; the calls already up keep their latency.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass

from runtime.procfs import tree_cpu_seconds, usable_cores
from runtime.workers import ModelWorker

SAMPLE_S = 1.0  # how often the CPU and the queues are read
TICK_S = 0.1  # the lateness probe's sleep
# What is measured is averaged over this long: a turn's work is a burst of a second or two, which
# says nothing of whether the machine is full; load that lasts does.
AVERAGE_S = 10.0
LAG_FULL_MS = 100.0  # event-loop lateness that counts as a full machine: five 20 ms frames late
QUEUED_FULL = 4  # model calls waiting (beyond those running) per core that count as a full machine
RETRY_AFTER_S = 5
# A question and its spoken answer take about this long (a 2-3 s question, a reply of up to two
# sentences): a caller and the agent who talk without a pause make one turn this often, and that
# turn's CPU spread over it is the call's share.
TURN_CYCLE_S = 6.0


@dataclass(frozen=True)
class Load:
    """One reading, each part a share of the machine (1.0: full), and the highest of them."""

    cpu: float  # the process's and its children's CPU, over its cores
    loop_lag: float  # the event loop's worst lateness each second, over LAG_FULL_MS
    queued: float  # model calls waiting, over QUEUED_FULL per core
    calls: float  # the calls up, each at `call_share`
    load: float

    def as_dict(self) -> dict[str, float]:
        return {key: round(value, 3) for key, value in asdict(self).items()}


def call_share(turn_cpu_s: float, cores: int | None = None) -> float:
    """The share of the machine one call takes while its caller and the agent talk without pause:
    a turn's CPU seconds every TURN_CYCLE_S, over the cores."""
    return turn_cpu_s / (TURN_CYCLE_S * (cores or usable_cores()))


class LoadMonitor:
    """Owns the server's measure of its own load: `run()` samples it every SAMPLE_S (the CPU of the
    process and its children, the event loop's lateness, the model workers' queues) into averages
    over about AVERAGE_S, `load()` reads it with a number of calls, and `admits()` says whether
    one more call stays within `max_load` (None: every call is admitted, as before there was a
    limit)."""

    def __init__(self, max_load: float | None, call_share: float, cores: int | None = None) -> None:
        self.max_load = max_load
        self.call_share = call_share
        self.cores = cores or usable_cores()
        self._cpu = 0.0
        self._lag_ms = 0.0
        self._queued = 0.0

    def load(self, calls: int) -> Load:
        parts = (self._cpu, self._lag_ms / LAG_FULL_MS, self._queued / (QUEUED_FULL * self.cores), calls * self.call_share)
        return Load(*parts, max(parts))

    def admits(self, calls: int) -> bool:
        """Whether a call more than `calls` stays within `max_load`."""
        return self.max_load is None or self.load(calls + 1).load <= self.max_load

    @property
    def capacity(self) -> int | None:
        """The calls the budget allows when nothing else loads the machine."""
        if self.max_load is None or self.call_share <= 0:
            return None
        return int(self.max_load / self.call_share + 1e-9)

    async def run(self) -> None:
        cpu_s, at = tree_cpu_seconds(os.getpid()), time.monotonic()
        worst_ms = 0.0
        while True:
            planned = time.monotonic() + TICK_S
            await asyncio.sleep(TICK_S)
            worst_ms = max(worst_ms, (time.monotonic() - planned) * 1000)
            if time.monotonic() - at < SAMPLE_S:
                continue
            cpu_now, now = await asyncio.to_thread(tree_cpu_seconds, os.getpid()), time.monotonic()
            queued = sum(max(0, worker.busy - worker.threads) for worker in ModelWorker.live())
            self.observe(cpu_now - cpu_s, now - at, worst_ms, queued)
            cpu_s, at, worst_ms = cpu_now, now, 0.0

    def observe(self, cpu_s: float, period_s: float, worst_lag_ms: float, queued: int) -> None:
        """One period's reading: CPU seconds used in it, the loop's worst lateness, the calls queued."""
        weight = min(1.0, period_s / AVERAGE_S)
        self._cpu += weight * (max(0.0, cpu_s) / period_s / self.cores - self._cpu)
        self._lag_ms += weight * (worst_lag_ms - self._lag_ms)
        self._queued += weight * (queued - self._queued)
